"""Llama-family transformers models (LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM) as stages.

The graphs are the converter's (hermes_ort/convert/llama_graph.py), filled from the torch model's
parameters under GGUF's tensor names, so a folder exported here and a GGUF converted on the board run the
same stages. torch only supplies the weights and, before publishing, the reference logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hermes_ort.convert.gguf_model import LlamaSettings
from hermes_ort.errors import HermesError

from .family import Case, Family

HF_NAMES = {  # GGUF tensor name (after "blk.{i}.") -> transformers parameter (after "model.layers.{i}.")
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    **{f"attn_{n}.{p}": f"self_attn.{n}_proj.{p}" for n in "qkv" for p in ("weight", "bias")},
    "attn_output.weight": "self_attn.o_proj.weight",
    **{f"ffn_{n}.weight": f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")},
}
TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}


def settings_of(model) -> LlamaSettings:
    c = model.config
    rope = getattr(c, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") not in ("default", "linear"):
        raise HermesError(f"rope type {rope.get('rope_type')!r} is not supported (default, linear)")
    if getattr(c, "head_dim", None) not in (None, c.hidden_size // c.num_attention_heads):
        raise HermesError(f"head_dim {c.head_dim} != hidden_size / heads is not supported")
    return LlamaSettings(
        architecture=c.model_type, layers=c.num_hidden_layers, hidden=c.hidden_size, heads=c.num_attention_heads,
        kv_heads=c.num_key_value_heads, ffn=c.intermediate_size, vocab=c.vocab_size,
        context=min(c.max_position_embeddings, getattr(c, "sliding_window", None) or 1 << 62),  # attention is
        # full: a longer context than Mistral's window would differ from transformers, so it is refused
        rope_base=float(rope.get("rope_theta", 10000.0)), rms_eps=c.rms_norm_eps,
        rope_linear_factor=float(rope.get("factor", 1.0)) if rope.get("rope_type") == "linear" else 1.0,
        tied_head=model.lm_head.weight is model.model.embed_tokens.weight,
        qkv_bias=model.model.layers[0].self_attn.q_proj.bias is not None)


@dataclass
class TorchTensors:
    """The converter's view of a model (settings, rows(name) by GGUF name) over a torch model's parameters."""

    model: torch.nn.Module
    settings: LlamaSettings

    def rows(self, name: str) -> np.ndarray:
        if name.startswith("blk."):
            _, i, rest = name.split(".", 2)
            hf = f"model.layers.{i}.{HF_NAMES[rest]}"
        else:
            hf = TOP_NAMES[name]
        return self.model.get_parameter(hf).detach().float().numpy()


def build_for(config_class: str, model_class: str):
    def build(settings: dict):
        import transformers

        config = getattr(transformers, config_class)(**settings, attn_implementation="eager")
        return getattr(transformers, model_class)(config)

    def load(folder: str):
        import transformers

        return getattr(transformers, model_class).from_pretrained(folder, attn_implementation="eager",
                                                                   dtype=torch.float32)

    return build, load


def empty_past(s: LlamaSettings, batch: int) -> dict[str, np.ndarray]:
    shape = (batch, s.kv_heads, 0, s.head_dim)
    return {f"past.{i}.{kv}": np.zeros(shape, np.float32) for i in range(s.layers) for kv in ("key", "value")}


def cases(model, rng, seq: int = 12) -> list[Case]:
    """Whole sequence without past, and the same tokens as a prefix step then a step with past."""
    from hermes_ort.generation.decoding import step_feed

    s = settings_of(model)
    ids = rng.integers(0, s.vocab, (2, seq))
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids), attention_mask=torch.ones(2, seq, dtype=torch.long)).logits
    want, k = want.numpy(), seq // 2

    def two_steps(run):
        first = run(step_feed(ids[:, :k], empty_past(s, 2), 0))
        past = {f"past.{n[len('present.'):]}": v for n, v in first.items() if n.startswith("present.")}
        return {"logits": np.concatenate([first["logits"], run(step_feed(ids[:, k:], past, k))["logits"]], 1)}

    return [Case("no past", {"logits": want}, lambda run: {"logits": run(step_feed(ids, empty_past(s, 2), 0))["logits"]}),
            Case("with past", {"logits": want}, two_steps)]


def family(name: str, model_types: tuple[str, ...], config_class: str, model_class: str) -> Family:
    build, load = build_for(config_class, model_class)
    return Family(name, model_types, build, load, stages=None, trace_feed=None, cases=cases,
                  extra_files=("generation_config.json",), graphs=lambda model: TorchTensors(model, settings_of(model)))


FAMILIES = (family("llama", ("llama",), "LlamaConfig", "LlamaForCausalLM"),
            family("qwen2", ("qwen2",), "Qwen2Config", "Qwen2ForCausalLM"),
            family("mistral", ("mistral",), "MistralConfig", "MistralForCausalLM"))
