"""BERT: embeddings, encoder layers fed the attention mask, head (pooler). The last block's output is
the model's last_hidden_state."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .family import Case, Family, StagePlan

B, S = "batch", "sequence"


class Embeddings(nn.Module):
    def __init__(self, embeddings):
        super().__init__()
        self.embeddings = embeddings

    def forward(self, input_ids, token_type_ids):  # [B, S] -> [B, S, E]
        return self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)


class Block(nn.Module):
    """An encoder layer that builds its additive mask from the [B, S] padding mask, as BertModel does."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, hidden, attention_mask):
        additive = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        out = self.layer(hidden, attention_mask=additive)
        return out[0] if isinstance(out, tuple) else out


class Pooler(nn.Module):
    def __init__(self, pooler):
        super().__init__()
        self.pooler = pooler

    def forward(self, hidden):  # [B, S, E] -> [B, E]
        return self.pooler(hidden)


def hidden_name(i: int, n: int) -> str:
    return "last_hidden_state" if i == n else f"hidden.{i}"


def stages(model) -> list[StagePlan]:
    n = model.config.num_hidden_layers
    seq_axes = {0: B, 1: S}
    plans = [StagePlan("embeddings", "embeddings", Embeddings(model.embeddings), ("input_ids", "token_type_ids"),
                       ("hidden.0",), {"input_ids": seq_axes, "token_type_ids": seq_axes, "hidden.0": seq_axes})]
    for i, layer in enumerate(model.encoder.layer):
        src, dst = hidden_name(i, n), hidden_name(i + 1, n)
        plans.append(StagePlan(f"block_{i:02d}", "block", Block(layer), (src, "attention_mask"), (dst,),
                               {src: seq_axes, dst: seq_axes, "attention_mask": seq_axes}))
    if model.pooler is not None:
        plans.append(StagePlan("head", "head", Pooler(model.pooler), ("last_hidden_state",), ("pooler_output",),
                               {"last_hidden_state": seq_axes, "pooler_output": {0: B}}))
    return plans


def example_feed(model, rng, batch: int = 2, seq: int = 16) -> dict[str, np.ndarray]:
    mask = np.ones((batch, seq), np.int64)
    mask[-1, seq * 3 // 4:] = 0  # a padded second row: the mask must reach every block
    return {"input_ids": rng.integers(0, model.config.vocab_size, (batch, seq)),
            "token_type_ids": (np.arange(seq)[None, :] >= seq // 2).astype(np.int64).repeat(batch, 0),
            "attention_mask": mask}


def cases(model, rng) -> list[Case]:
    feed = example_feed(model, rng)
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in feed.items()})
    expected = {"last_hidden_state": out.last_hidden_state.numpy()}
    if out.pooler_output is not None:
        expected["pooler_output"] = out.pooler_output.numpy()
    return [Case("padded batch", expected, lambda run: run(feed))]


def build(settings: dict):
    from transformers import BertConfig, BertModel
    return BertModel(BertConfig(**settings, attn_implementation="eager"))


def load(folder: str):
    from transformers import BertModel
    return BertModel.from_pretrained(folder, attn_implementation="eager")


FAMILY = Family("bert", ("bert",), build, load, stages, lambda m, rng: example_feed(m, rng, 1, 7), cases,
                keep_outputs=("last_hidden_state",))
