"""A Llama-family GGUF file read as a model: its settings, and its tensors one at a time (memory-mapped).

GGUF stores a matrix of `out` rows of `in` values as numpy shape [out, in] (blocks of a quantization type
run along `in`). llama.cpp's converter permutes the rows of Q and K for the `llama` and `mistral`
architectures (interleaved rotary pairs); `rows()` undoes that so the graphs use transformers' layout.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import HermesError


class ConvertError(HermesError):
    """A GGUF file cannot be converted: not a GGUF, truncated, or an architecture or type we do not read."""


@dataclass(frozen=True)
class Architecture:
    """What differs between Llama-family architectures in a GGUF file: one small record each."""

    name: str
    permuted_qk: bool  # llama.cpp permuted Q/K rows at conversion (llama, mistral)
    qkv_bias: bool  # Q, K and V projections carry biases (qwen2)
    qk_norm: bool = False  # per-head RMSNorm of q and k before the rotary (attn_q_norm / attn_k_norm, qwen3)
    fused: bool = False  # one attn_qkv matrix and one ffn_up holding gate then up (phi3)
    gemma: bool = False  # embeddings times sqrt(hidden), norms after attention and MLP too, GELU-tanh gate
    sliding_pattern: int = 0  # every n-th layer attends globally, the others over attention.sliding_window
    local_rope_base: float = 10000.0  # the sliding layers' rotary base (llama.cpp's rope_freq_base_train_swa)


ARCHITECTURES = {a.name: a for a in (
    Architecture("llama", permuted_qk=True, qkv_bias=False),
    Architecture("mistral", permuted_qk=True, qkv_bias=False),
    Architecture("qwen2", permuted_qk=False, qkv_bias=True),
    Architecture("qwen3", permuted_qk=False, qkv_bias=False, qk_norm=True),
    Architecture("phi3", permuted_qk=False, qkv_bias=False, fused=True),
    Architecture("gemma3", permuted_qk=False, qkv_bias=False, qk_norm=True, gemma=True, sliding_pattern=6),
)}


@dataclass(frozen=True)
class LlamaSettings:
    """The numbers a Llama-family graph needs, read from the GGUF metadata."""

    architecture: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    context: int
    rope_base: float
    rms_eps: float
    rope_linear_factor: float = 1.0  # positions divided by it ("linear" rope scaling)
    tied_head: bool = True
    qkv_bias: bool = False
    qk_norm: bool = False
    key_length: int | None = None  # head_dim when the file gives it (qwen3: 128 at hidden 1024 / 16 heads)
    rope_divisors: tuple[float, ...] = ()  # rope_freqs.weight: each frequency divided by its factor (Llama 3.x)
    rope_attention_factor: float = 1.0  # longrope: cos and sin scaled by it (rope.scaling.attn_factor)
    fused: bool = False
    gemma: bool = False
    sliding_pattern: int = 0
    window: int | None = None  # the sliding layers' attention.sliding_window
    local_rope_base: float = 10000.0
    rotary_dim: int | None = None  # rope.dimension_count: only the first rotary_dim of each head rotate (phi3)

    @property
    def rotated(self) -> int:
        return self.rotary_dim or self.head_dim

    def local(self, layer: int) -> bool:
        """Layer attends over the sliding window only (gemma3: five of every six)."""
        return bool(self.sliding_pattern and self.window and (layer + 1) % self.sliding_pattern)

    @property
    def head_dim(self) -> int:
        return self.key_length or self.hidden // self.heads

    def as_config(self) -> dict:
        """transformers-style names, which the rest of hermes_ort reads (max_position_embeddings, ...)."""
        return {"architecture": self.architecture, "num_hidden_layers": self.layers, "hidden_size": self.hidden,
                "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
                "intermediate_size": self.ffn, "vocab_size": self.vocab, "max_position_embeddings": self.context,
                "rope_theta": self.rope_base, "rms_norm_eps": self.rms_eps,
                "rope_linear_factor": self.rope_linear_factor, "tie_word_embeddings": self.tied_head,
                "head_dim": self.head_dim, "rope_freq_factors": bool(self.rope_divisors),
                "rotary_dim": self.rotated, "local_window": self.window if self.sliding_pattern else None,
                "local_layers": [i for i in range(self.layers) if self.local(i)]}


def readable(kind) -> bool:
    """gguf-py dequantizes this tensor type (every type found in model files, in gguf 0.19)."""
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    if kind.name in ("F32", "F16", "BF16"):
        return True
    if kind not in GGML_QUANT_SIZES:
        return False
    values, nbytes = GGML_QUANT_SIZES[kind]
    try:
        dequantize(np.zeros((1, nbytes), np.uint8), kind)
    except (NotImplementedError, ValueError, TypeError):
        return False
    return True


class GGUFModel:
    """Opens a GGUF file; `settings`, `tensor_type(name)`, `rows(name)` (float32 [out, in]) and `raw(name)`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.reader = open_reader(self.path)
        self.tensors = {t.name: t for t in self.reader.tensors}
        arch = self.field("general.architecture")
        if arch not in ARCHITECTURES:
            raise ConvertError(f"{self.path}: architecture {arch!r} is not supported (supported: "
                               f"{', '.join(ARCHITECTURES)})")
        self.arch = ARCHITECTURES[arch]
        self.settings = self._settings()
        self._check_types()
        self._check_shapes()

    def field(self, key: str, default=None):
        found = self.reader.get_field(key)
        if found is None:
            return default
        try:
            return found.contents()
        except (UnicodeDecodeError, ValueError, IndexError, TypeError) as e:
            raise ConvertError(f"{self.path}: metadata key {key!r} cannot be read ({type(e).__name__}: {e})") from e

    def _check_shapes(self) -> None:
        """Metadata that contradicts the tensors is refused here, naming the numbers, not at ORT's Reshape."""
        s, a = self.settings, self.arch.name
        if s.layers < 1 or s.hidden < 1 or s.heads < 1 or s.kv_heads < 1 or s.ffn < 1 or s.head_dim < 2 or not (
                2 <= s.rotated <= s.head_dim and s.rotated % 2 == 0):
            raise ConvertError(f"{self.path}: metadata gives {s.layers} layers, hidden {s.hidden}, {s.heads} heads, "
                               f"{s.kv_heads} KV heads, ffn {s.ffn}, head_dim {s.head_dim}, rotary dims {s.rotated}: "
                               f"every one must be positive, the rotary dims even and at most head_dim")
        for key, number in (("rope.freq_base", s.rope_base), ("attention.layer_norm_rms_epsilon", s.rms_eps),
                            ("rope.scaling.factor", s.rope_linear_factor),
                            ("rope.scaling.attn_factor", s.rope_attention_factor), ("context_length", s.context)):
            if not (np.isfinite(number) and number > 0):
                raise ConvertError(f"{self.path}: metadata {a}.{key} is {number}: it must be a positive number")
        if s.sliding_pattern and s.window is not None and s.window < 2:
            raise ConvertError(f"{self.path}: {a}.attention.sliding_window is {s.window}: at least 2 is needed")
        if (s.key_length is None and s.hidden % s.heads) or s.heads % s.kv_heads:
            raise ConvertError(f"{self.path}: {a}.attention.head_count {s.heads} does not divide "
                               f"{a}.embedding_length {s.hidden}, or {a}.attention.head_count_kv {s.kv_heads} "
                               f"does not divide it")
        d = s.head_dim
        want = {"token_embd.weight": (s.vocab, s.hidden), "output_norm.weight": (s.hidden,)}
        for i in range(s.layers):
            p = f"blk.{i}."
            want |= {p + "attn_norm.weight": (s.hidden,), p + "ffn_norm.weight": (s.hidden,),
                     p + "attn_q.weight": (s.heads * d, s.hidden), p + "attn_k.weight": (s.kv_heads * d, s.hidden),
                     p + "attn_v.weight": (s.kv_heads * d, s.hidden), p + "attn_output.weight": (s.hidden, s.heads * d),
                     p + "ffn_gate.weight": (s.ffn, s.hidden), p + "ffn_up.weight": (s.ffn, s.hidden),
                     p + "ffn_down.weight": (s.hidden, s.ffn)}
            if s.fused:
                for n in ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up"):
                    del want[p + n + ".weight"]
                want |= {p + "attn_qkv.weight": ((s.heads + 2 * s.kv_heads) * d, s.hidden),
                         p + "ffn_up.weight": (2 * s.ffn, s.hidden)}
            if s.qk_norm:
                want |= {p + "attn_q_norm.weight": (d,), p + "attn_k_norm.weight": (d,)}
            if s.gemma:
                want |= {p + "post_attention_norm.weight": (s.hidden,), p + "post_ffw_norm.weight": (s.hidden,)}
        if not s.tied_head:
            want["output.weight"] = (s.vocab, s.hidden)
        if s.rope_divisors:
            name = "rope_freqs.weight" if "rope_freqs.weight" in self.tensors else "rope_factors_short.weight"
            want[name] = (s.rotated // 2,)
        for name, shape in want.items():
            got = tuple(int(n) for n in reversed(self._tensor(name).shape))  # GGUF lists in first
            if got != shape:
                raise ConvertError(f"{self.path}: tensor {name!r} has shape {list(got)} where the metadata "
                                   f"({a}.*) implies {list(shape)}")

    def _settings(self) -> LlamaSettings:
        a, need = self.arch.name, self._required
        hidden, heads = need(f"{a}.embedding_length"), need(f"{a}.attention.head_count")
        scaling = self.field(f"{a}.rope.scaling.type", "none")
        if scaling not in ("none", "linear"):
            raise ConvertError(f"{self.path}: rope scaling {scaling!r} is not supported (none, linear, and the "
                               f"per-frequency factors of rope_freqs.weight)")
        window = self.field(f"{a}.attention.sliding_window")  # full attention: a context past it would differ
        window_caps = None if self.arch.sliding_pattern else window  # gemma3: only its local layers slide
        embed = self._tensor("token_embd.weight")
        context = need(f"{a}.context_length")
        longrope = "rope_factors_short.weight" in self.tensors
        if longrope:  # llama.cpp's choice for a context up to the original one: the short factors
            original = int(self.field(f"{a}.rope.scaling.original_context_length", context))
            scale = context / max(original, 1)
            default = float(np.sqrt(1 + np.log(scale) / np.log(original))) if scale > 1 else 1.0
            attention = float(self.field(f"{a}.rope.scaling.attn_factor", default))
            context = original
        return LlamaSettings(
            architecture=a, layers=need(f"{a}.block_count"), hidden=hidden, heads=heads,
            kv_heads=self.field(f"{a}.attention.head_count_kv", heads), ffn=need(f"{a}.feed_forward_length"),
            vocab=int(embed.shape[-1]), context=min(context, window_caps or 1 << 62),
            rope_attention_factor=attention if longrope else 1.0,
            rope_base=float(self.field(f"{a}.rope.freq_base", 10000.0)),
            rms_eps=float(need(f"{a}.attention.layer_norm_rms_epsilon")),
            rope_linear_factor=float(self.field(f"{a}.rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0,
            tied_head="output.weight" not in self.tensors, qkv_bias=self.arch.qkv_bias, qk_norm=self.arch.qk_norm,
            key_length=self.field(f"{a}.attention.key_length"), rope_divisors=self._rope_divisors(),
            fused=self.arch.fused, rotary_dim=self.field(f"{a}.rope.dimension_count"), gemma=self.arch.gemma,
            sliding_pattern=self.arch.sliding_pattern, window=window if self.arch.sliding_pattern else None,
            local_rope_base=self.arch.local_rope_base)

    def _rope_divisors(self) -> tuple[float, ...]:
        """Each frequency's divisor: Llama 3's rope_freqs, or phi3's longrope short factors (its contexts up to
        the original length; the long factors serve longer ones, which the conversion does not offer)."""
        name = next((n for n in ("rope_freqs.weight", "rope_factors_short.weight") if n in self.tensors), None)
        if name is None:
            return ()
        from gguf.quants import dequantize

        t = self.tensors[name]
        return tuple(float(v) for v in dequantize(t.data, t.tensor_type).astype(np.float32).ravel())

    def _required(self, key: str):
        value = self.field(key)
        if value is None:
            raise ConvertError(f"{self.path}: metadata key {key!r} is missing")
        return value

    def _tensor(self, name: str):
        if name not in self.tensors:
            raise ConvertError(f"{self.path}: tensor {name!r} is missing")
        return self.tensors[name]

    def _check_types(self) -> None:
        known: dict = {}
        for t in self.reader.tensors:
            if known.setdefault(t.tensor_type, readable(t.tensor_type)) is False:
                raise ConvertError(f"{self.path}: tensor {t.name!r} is of type {t.tensor_type.name}, which "
                                   f"cannot be read (no dequantization for it in the gguf package)")

    def tensor_type(self, name: str) -> str:
        return self._tensor(name).tensor_type.name

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes [out, bytes per row] (a view of the mapped file), Q/K rows un-permuted."""
        data = self._tensor(name).data
        return self._unpermute(name, data.view(np.uint8).reshape(data.shape[0], -1))

    def rows(self, name: str) -> np.ndarray:
        """float32 [out, in] (or [n] for vectors), dequantized, Q/K rows un-permuted."""
        from gguf.quants import dequantize

        t = self._tensor(name)
        values = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        return self._unpermute(name, values)

    def _unpermute(self, name: str, rows: np.ndarray) -> np.ndarray:
        if not self.arch.permuted_qk or rows.ndim != 2:
            return rows
        s = self.settings
        heads = {"attn_q.weight": s.heads, "attn_k.weight": s.kv_heads}.get(name.split(".", 2)[-1])
        if heads is None:
            return rows
        # llama.cpp: w.reshape(heads, 2, half, ...).swapaxes(1, 2); its inverse swaps the same two axes back
        half = rows.shape[0] // heads // 2
        return np.ascontiguousarray(rows.reshape(heads, half, 2, -1).swapaxes(1, 2).reshape(rows.shape))


def open_reader(path: Path):
    from gguf import GGUFReader

    if not path.is_file():
        raise ConvertError(f"{path}: no such file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ConvertError(f"{path}: not a GGUF file (it does not start with the GGUF magic)")
    try:
        return GGUFReader(path)
    except (ValueError, IndexError, OSError) as e:
        raise ConvertError(f"{path}: cannot be read as GGUF (truncated or corrupt?): {e}") from e
