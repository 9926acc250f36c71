"""ViT: patch embeddings, encoder layers, head (final layernorm, then classifier or pooler when present)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .family import Case, Family, StagePlan

B = "batch"


class Embeddings(nn.Module):
    def __init__(self, embeddings):
        super().__init__()
        self.embeddings = embeddings

    def forward(self, pixel_values):  # [B, C, H, W] -> [B, 1 + patches, E]
        return self.embeddings(pixel_values)


class Block(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, hidden):
        out = self.layer(hidden)
        return out[0] if isinstance(out, tuple) else out


class Head(nn.Module):
    """layernorm -> last_hidden_state; then logits from the [CLS] token, or the pooler's output."""

    def __init__(self, layernorm, classifier=None, pooler=None):
        super().__init__()
        self.layernorm, self.classifier, self.pooler = layernorm, classifier, pooler

    def forward(self, hidden):
        last = self.layernorm(hidden)
        if self.classifier is not None:
            return last, self.classifier(last[:, 0, :])
        return (last, self.pooler(last)) if self.pooler is not None else last


def backbone(model):
    return getattr(model, "vit", model)


def encoder_layers(vit):
    """Layers live at vit.layers in some transformers versions, vit.encoder.layer in others."""
    return vit.layers if hasattr(vit, "layers") else vit.encoder.layer


def stages(model) -> list[StagePlan]:
    vit = backbone(model)
    layers = encoder_layers(vit)
    plans = [StagePlan("embeddings", "embeddings", Embeddings(vit.embeddings), ("pixel_values",), ("hidden.0",),
                       {"pixel_values": {0: B}, "hidden.0": {0: B}})]
    for i, layer in enumerate(layers):
        plans.append(StagePlan(f"block_{i:02d}", "block", Block(layer), (f"hidden.{i}",), (f"hidden.{i + 1}",),
                               {f"hidden.{i}": {0: B}, f"hidden.{i + 1}": {0: B}}))
    classifier = getattr(model, "classifier", None)
    pooler = getattr(vit, "pooler", None)
    extra = ("logits",) if classifier is not None else ("pooler_output",) if pooler is not None else ()
    plans.append(StagePlan("head", "head", Head(vit.layernorm, classifier, pooler), (f"hidden.{len(layers)}",),
                           ("last_hidden_state", *extra),
                           {f"hidden.{len(layers)}": {0: B}, "last_hidden_state": {0: B},
                            **{e: {0: B} for e in extra}}))
    return plans


def example_feed(model, rng, batch: int = 2) -> dict[str, np.ndarray]:
    c = model.config
    return {"pixel_values": rng.standard_normal((batch, c.num_channels, c.image_size, c.image_size)).astype(
        np.float32)}


def cases(model, rng) -> list[Case]:
    feed = example_feed(model, rng)
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(feed["pixel_values"]), output_hidden_states=True)
    names = [p.outputs for p in stages(model)][-1]
    hidden = backbone(model).layernorm(out.hidden_states[-1]) if hasattr(out, "logits") else None
    expected = {"last_hidden_state": (hidden if hidden is not None else out.last_hidden_state).detach().numpy()}
    if "logits" in names:
        expected["logits"] = out.logits.numpy()
    if "pooler_output" in names:
        expected["pooler_output"] = out.pooler_output.numpy()
    return [Case("batch of 2", expected, lambda run: run(feed))]


def build(settings: dict):
    from transformers import ViTConfig, ViTForImageClassification, ViTModel
    config = ViTConfig(**settings, attn_implementation="eager")
    return ViTForImageClassification(config) if "num_labels" in settings else ViTModel(config)


def load(folder: str):
    from transformers import AutoConfig, ViTForImageClassification, ViTModel
    archs = AutoConfig.from_pretrained(folder).architectures or []
    cls = ViTForImageClassification if "ViTForImageClassification" in archs else ViTModel
    return cls.from_pretrained(folder, attn_implementation="eager")


FAMILY = Family("vit", ("vit",), build, load, stages, lambda m, rng: example_feed(m, rng, 1), cases)
