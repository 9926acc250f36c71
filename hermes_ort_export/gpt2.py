"""GPT-2: embeddings (wte + wpe), blocks that take `past` and return `present`, head (ln_f + tied LM head)."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx
from onnx import helper, numpy_helper
import torch
from torch import nn
from torch.nn import functional as F

from hermes_ort.generation.decoding import step_feed
from hermes_ort.format.weights import head_splits

from .family import Case, Family, StagePlan

B, S, T, P = "batch", "sequence", "total_sequence", "past_sequence"


class Embeddings(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.wte, self.wpe = model.transformer.wte, model.transformer.wpe

    def forward(self, input_ids, position_ids):  # [B, S] each -> [B, S, E]
        return self.wte(input_ids) + self.wpe(position_ids)


def causal_mask(attention_mask: torch.Tensor, seq: int) -> torch.Tensor:
    """[B, T] padding mask -> [B, 1, S, T] bool: query i (at position T-S+i) sees keys j <= T-S+i."""
    total = attention_mask.shape[1]
    query_pos = torch.arange(seq, device=attention_mask.device) + (total - seq)
    key_pos = torch.arange(total, device=attention_mask.device)
    causal = key_pos[None, :] <= query_pos[:, None]  # [S, T]
    return causal[None, None] & attention_mask[:, None, None, :].bool()


class Block(nn.Module):
    """A GPT-2 block with its KV cache as plain tensors: past [B, H, P, D] in, present [B, H, P+S, D] out."""

    def __init__(self, block, n_head: int):
        super().__init__()
        self.block, self.n_head = block, n_head

    def heads(self, x):  # [B, S, E] -> [B, H, S, D]
        b, s, e = x.shape
        return x.view(b, s, self.n_head, e // self.n_head).transpose(1, 2)

    def forward(self, hidden, attention_mask, past_key, past_value):
        attn = self.block.attn
        q, k, v = attn.c_attn(self.block.ln_1(hidden)).split(hidden.shape[-1], dim=2)
        key = torch.cat([past_key, self.heads(k)], dim=2)  # [B, H, T, D]
        value = torch.cat([past_value, self.heads(v)], dim=2)
        scores = self.heads(q) @ key.transpose(-1, -2) / math.sqrt(key.shape[-1])  # [B, H, S, T]
        mask = causal_mask(attention_mask, hidden.shape[1])
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        context = (F.softmax(scores, dim=-1) @ value).transpose(1, 2).flatten(2)  # [B, S, E]
        hidden = hidden + attn.c_proj(context)
        hidden = hidden + self.block.mlp(self.block.ln_2(hidden))
        return hidden, key, value


class HeadPart(nn.Module):
    """Logits for LM-head rows [start, end). The head is cut into parts about a block's size, so no stage
    holds the whole [V, E] matrix: the first part applies ln_f and passes the normed hidden state on,
    the last one concatenates every part's logits."""

    def __init__(self, weight, ln_f=None, emit_normed=False, concat=False):
        super().__init__()
        self.register_buffer("weight", weight.detach().contiguous())
        self.ln_f, self.emit_normed, self.concat = ln_f, emit_normed, concat

    def forward(self, hidden, *earlier_parts):  # [B, S, E] -> [B, S, end - start]
        hidden = self.ln_f(hidden) if self.ln_f is not None else hidden
        b, s, e = hidden.shape
        logits = F.linear(hidden.reshape(-1, e), self.weight).reshape(b, s, -1)  # 2-D: Gemm(transB=1) on W as is
        logits = torch.cat([*earlier_parts, logits], dim=-1) if self.concat else logits
        return (hidden, logits) if self.emit_normed else logits


def head_plans(model, splits: list[tuple[int, int]]) -> list[StagePlan]:
    n, weight, ln_f = model.config.n_layer, model.lm_head.weight.detach(), model.transformer.ln_f
    hidden, normed, k = f"hidden.{n}", "hidden.final", len(splits)
    seq_axes = {0: B, 1: S}
    plans = []
    for j, (start, end) in enumerate(splits):
        first, last = j == 0, j == k - 1
        inputs = (hidden,) if first else (normed, *[f"logits.{p}" for p in range(j)] * last)
        outputs = ((normed,) if first and not last else ()) + ("logits" if last else f"logits.{j}",)
        module = HeadPart(weight[start:end], ln_f if first else None, first and not last, last and k > 1)
        plans.append(StagePlan(f"head_{j:02d}" if k > 1 else "head", "head", module, inputs, outputs,
                               {t: seq_axes for t in (*inputs, *outputs)},
                               gemm_on_stored_weight(weight[start:end].numpy())))
    return plans


def gemm_on_stored_weight(weight: np.ndarray):
    """Returns a graph rewrite: MatMul(x, W^T-as-folded-initializer) -> Gemm(x, W, transB=1), so the head
    references the very bytes of the tied embedding matrix and the writer stores them once."""

    def rewrite(model: onnx.ModelProto) -> onnx.ModelProto:
        graph = model.graph
        folded = next(t for t in graph.initializer if t.dims == list(weight.shape[::-1])
                      and np.array_equal(numpy_helper.to_array(t), weight.T))
        node = next(n for n in graph.node if n.op_type == "MatMul" and n.input[1] == folded.name)
        folded.CopyFrom(numpy_helper.from_array(weight, folded.name))
        gemm = helper.make_node("Gemm", list(node.input), list(node.output), name=node.name, transB=1)
        node.CopyFrom(gemm)
        return model

    return rewrite


def stages(model) -> list[StagePlan]:
    plans = [StagePlan("embeddings", "embeddings", Embeddings(model), ("input_ids", "position_ids"),
                       ("hidden.0",), {"input_ids": {0: B, 1: S}, "position_ids": {0: B, 1: S},
                                       "hidden.0": {0: B, 1: S}})]
    for i, block in enumerate(model.transformer.h):
        past, present = (f"past.{i}.key", f"past.{i}.value"), (f"present.{i}.key", f"present.{i}.value")
        axes = {f"hidden.{i}": {0: B, 1: S}, f"hidden.{i + 1}": {0: B, 1: S}, "attention_mask": {0: B, 1: T},
                **{p: {0: B, 2: P} for p in past}, **{p: {0: B, 2: T} for p in present}}
        plans.append(StagePlan(f"block_{i:02d}", "block", Block(block, model.config.n_head),
                               (f"hidden.{i}", "attention_mask", *past), (f"hidden.{i + 1}", *present), axes))
    block_bytes = sum(p.numel() * p.element_size() for p in model.transformer.h[0].parameters())
    weight = model.lm_head.weight.detach()
    splits = head_splits(weight.shape[0], weight[0].numel() * weight.element_size(), block_bytes)
    if model.lm_head.weight is model.transformer.wte.weight:
        plans[0] = dataclasses.replace(plans[0], row_slices=(weight.numpy(), splits))
    return plans + head_plans(model, splits)


def empty_past(config, batch: int, length: int = 0, rng=None) -> dict[str, np.ndarray]:
    shape = (batch, config.n_head, length, config.n_embd // config.n_head)
    make = (lambda: rng.standard_normal(shape).astype(np.float32)) if rng else (lambda: np.zeros(shape, np.float32))
    return {f"past.{i}.{kv}": make() for i in range(config.n_layer) for kv in ("key", "value")}


def trace_feed(model, rng) -> dict[str, np.ndarray]:
    ids = rng.integers(0, model.config.vocab_size, (1, 5))
    return step_feed(ids, empty_past(model.config, 1, 3, rng), 3)


def presents_as_past(outputs: dict, n_layer: int) -> dict[str, np.ndarray]:
    return {f"past.{i}.{kv}": outputs[f"present.{i}.{kv}"] for i in range(n_layer) for kv in ("key", "value")}


def cases(model, rng, seq: int = 16) -> list[Case]:
    """Whole sequence without past, and the same tokens as a prefix step then a step with past."""
    cfg = model.config
    ids = rng.integers(0, cfg.vocab_size, (2, seq))
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(ids), attention_mask=torch.ones(2, seq, dtype=torch.long)).logits
    logits, k = logits.numpy(), seq // 2
    outputs = ["logits"]

    def two_steps(run):
        first = run(step_feed(ids[:, :k], empty_past(cfg, 2), 0))
        second = run(step_feed(ids[:, k:], presents_as_past(first, cfg.n_layer), k))
        return {"logits": np.concatenate([first["logits"], second["logits"]], axis=1)}

    return [Case("no past", {"logits": logits}, lambda run: {o: run(step_feed(ids, empty_past(cfg, 2), 0))[o]
                                                            for o in outputs}),
            Case("with past", {"logits": logits}, two_steps)]


def build(settings: dict):
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(**settings, attn_implementation="eager"))


def load(folder: str):
    from transformers import GPT2LMHeadModel
    return GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager")


FAMILY = Family("gpt2", ("gpt2",), build, load, stages, trace_feed, cases)
