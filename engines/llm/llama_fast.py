"""A lean forward pass for Llama models, so decoding costs the matrix products and little else.

For a model as small as SmolLM2-135M, transformers spends a large share of each decoding step on
per-operation bookkeeping, and one-row products over the usual weight layout leave memory
bandwidth unused. This pass takes the weights of the model transformers loaded (so loading stays
the real, general path) and runs the same computation with fewer, larger operations: q/k/v in
one matrix product, gate/up in one, wide matrices kept transposed (a one-row product then streams
them in order), rotary tables computed once by the model's own rotary module, a key/value cache
that grows in place, and only the last position through the LM head. The original projections
are rebound as views of the fused matrices, so the model keeps working.

Decoding one token reads every weight once, so on a CPU its speed is memory bandwidth: the
products read a half-precision copy of the weights (FBGEMM's fp16 kernel, fp32 arithmetic),
~30% faster per token than fp32 and ~35% faster for a turn's prefill of a dozen tokens than
oneDNN's packed fp32, with the same greedy tokens on the bundled model (fp16 holds its 4-bit
weights almost exactly). Where that kernel is missing, prefill uses a packed fp32 copy.

Greedy decoding with transformers' repetition penalty gives the same tokens as its ``generate``
(the tests compare them). Models this pass does not cover are reported by
:func:`unsupported_reason` and keep the transformers path.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from engines.llm import decoding
from engines.llm.decoding import StopFlag, Stopped

__all__ = ["FastLlama", "KVCache", "Stopped", "eos_ids", "unsupported_reason"]

CHUNK = 64  # prompt tokens per prefill step: a stop is seen within one layer of one chunk
GROW = 256  # the key/value cache grows by this many positions at a time
PACK_LIMIT = 1 << 30  # bytes of layer weights up to which prefill gets its own packed copy
PACK_ROWS = 16  # the prompt rows oneDNN's packed layout is chosen for

# Generation settings that would change greedy decoding and that this pass does not implement.
_UNSUPPORTED_GENERATION = ("no_repeat_ngram_size", "bad_words_ids", "suppress_tokens",
                           "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id",
                           "sequence_bias", "min_length", "min_new_tokens",
                           "encoder_repetition_penalty", "exponential_decay_length_penalty")


def unsupported_reason(model: Any) -> str | None:
    """Why ``model`` cannot run on this pass, or None when it can."""
    config = model.config
    if type(model).__name__ != "LlamaForCausalLM" or config.model_type != "llama":
        return f"architecture {type(model).__name__} ({config.model_type})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act}"
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = str(rope.get("rope_type", rope.get("type", "default")))
    if "dynamic" in rope_type or "longrope" in rope_type:
        return f"rope type {rope_type} (its frequencies depend on the sequence length)"
    generation = getattr(model, "generation_config", None)
    for name in _UNSUPPORTED_GENERATION:
        value = getattr(generation, name, None)
        if value not in (None, 0, [], {}, 1.0):
            return f"generation setting {name}={value!r}"
    for layer in model.model.layers:
        if type(layer).__name__ != "LlamaDecoderLayer":
            return f"decoder layer {type(layer).__name__}"
    return None


@dataclass(slots=True)
class KVCache:
    """Keys and values of every layer for the positions ``ids`` (one sequence)."""

    keys: torch.Tensor  # (layers, kv_heads, capacity, head_dim)
    values: torch.Tensor
    ids: list[int] = field(default_factory=list)

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def reserve(self, length: int) -> None:
        """Make room for ``length`` positions, keeping those filled."""
        if length <= self.capacity:
            return
        size = -(-length // GROW) * GROW
        shape = (*self.keys.shape[:2], size, self.keys.shape[3])
        keys = self.keys.new_empty(shape)
        values = self.values.new_empty(shape)
        n = len(self.ids)
        keys[:, :, :n] = self.keys[:, :, :n]
        values[:, :, :n] = self.values[:, :, :n]
        self.keys, self.values = keys, values

    def truncate(self, length: int) -> None:
        del self.ids[length:]

    def copy_prefix(self, length: int) -> KVCache:
        """A new cache holding the first ``length`` positions of this one."""
        size = max(GROW, -(-length // GROW) * GROW)
        shape = (*self.keys.shape[:2], size, self.keys.shape[3])
        out = KVCache(self.keys.new_empty(shape), self.values.new_empty(shape),
                      list(self.ids[:length]))
        out.keys[:, :, :length] = self.keys[:, :, :length]
        out.values[:, :, :length] = self.values[:, :, :length]
        return out

    def load_prefix(self, other: KVCache, length: int) -> None:
        """Replace this cache's contents with the first ``length`` positions of ``other``."""
        self.reserve(length)
        self.keys[:, :, :length] = other.keys[:, :, :length]
        self.values[:, :, :length] = other.values[:, :, :length]
        self.ids[:] = other.ids[:length]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


class _Linear:
    """``x @ W.T + b`` for one or more linear layers fused into one product.

    On a CPU, a matrix with more outputs than inputs is kept transposed (inputs x outputs): a
    one-row product then streams it in order, about 1.5x faster than the usual layout; the
    others keep it. The layers' own weights become views of the fused one. :meth:`pack` adds a
    copy in oneDNN's blocked layout for products of a handful of rows (a turn's prefill), which
    MKL computes poorly from either plain layout: prefills of 4-24 tokens take 15-25% less time,
    for the price of holding the layer weights twice (models up to :data:`PACK_LIMIT`).
    :meth:`pack_half` adds FBGEMM's half-precision copy instead, faster still for one row and
    for a handful (see the module docstring); when it is there, every product uses it.
    """

    __slots__ = ("bias", "half", "packed", "transposed", "weight")

    def __init__(self, modules: list[Any]) -> None:
        weight = torch.cat([m.weight.detach() for m in modules])
        biases = [m.bias for m in modules]
        bias = (torch.cat([b.detach() for b in biases]) if all(b is not None for b in biases)
                else None)
        rows, cols = weight.shape
        self.transposed = weight.device.type == "cpu" and rows > cols
        self.weight = weight.T.contiguous() if self.transposed else weight
        self.bias = bias
        self.packed: torch.Tensor | None = None
        self.half: Any = None  # FBGEMM's packed fp16 weight, used for every product when set
        view = self.weight.T if self.transposed else self.weight
        start = 0
        for m in modules:
            n = m.weight.shape[0]
            m.weight.data = view[start:start + n]
            if bias is not None:
                m.bias.data = bias[start:start + n]
            start += n

    @property
    def out_features(self) -> int:
        return self.weight.shape[1 if self.transposed else 0]

    def pack(self) -> None:
        dense = self.weight.T.contiguous() if self.transposed else self.weight
        self.packed = torch.ops.mkldnn._reorder_linear_weight(dense, PACK_ROWS)

    def pack_half(self) -> None:
        dense = self.weight.T.contiguous() if self.transposed else self.weight
        self.half = torch.ops.quantized.linear_prepack_fp16(dense, self.bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.half is not None:
            return torch.ops.quantized.linear_dynamic_fp16(x, self.half)
        if self.packed is not None and x.shape[0] > 1:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        if not self.transposed:
            return F.linear(x, self.weight, self.bias)
        if self.bias is None:
            return torch.mm(x, self.weight)
        return torch.addmm(self.bias, x, self.weight)


def _own(module: Any) -> torch.Tensor:
    """The weight of ``module`` copied into memory of its own (no longer a view of the mapped
    checkpoint file, which can then be unmapped), the module's weight rebound to it."""
    weight = module.weight.detach().clone()
    module.weight.data = weight
    return weight


@dataclass(slots=True)
class _Layer:
    norm1: torch.Tensor
    qkv: _Linear
    out: _Linear
    norm2: torch.Tensor
    gate_up: _Linear
    down: _Linear


class FastLlama:
    """Forward passes and greedy decoding for one loaded ``LlamaForCausalLM``."""

    def __init__(self, model: Any, half_decode: bool = True) -> None:
        config = model.config
        inner = model.model
        self.config = config
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.hidden = config.hidden_size
        self.eps = float(config.rms_norm_eps)
        self.device = inner.embed_tokens.weight.device
        self.dtype = inner.embed_tokens.weight.dtype
        self.final_norm = _own(inner.norm)
        self.lm_head = _Linear([model.get_output_embeddings()])
        embed = inner.embed_tokens
        self.embed = (embed.weight.detach() if embed.weight is model.get_output_embeddings().weight
                      else _own(embed))  # tied: already a view of the head's copy
        self._rotary = inner.rotary_emb
        self.layers = [
            _Layer(_own(layer.input_layernorm),
                   _Linear([layer.self_attn.q_proj, layer.self_attn.k_proj,
                            layer.self_attn.v_proj]),
                   _Linear([layer.self_attn.o_proj]),
                   _own(layer.post_attention_layernorm),
                   _Linear([layer.mlp.gate_proj, layer.mlp.up_proj]),
                   _Linear([layer.mlp.down_proj]))
            for layer in inner.layers]
        self.half = half_decode and self._pack_half()
        self.packed = not self.half and self._pack()
        self.q_size = self.heads * self.head_dim
        self.kv_size = self.kv_heads * self.head_dim
        self.intermediate = self.layers[0].gate_up.out_features // 2
        self._cos = self._sin_signed = torch.empty(0)
        self._rope(min(config.max_position_embeddings, 4096))  # grown when needed

    def _products(self) -> list[_Linear]:
        return [lin for layer in self.layers
                for lin in (layer.qkv, layer.out, layer.gate_up, layer.down)]

    def _pack(self) -> bool:
        """Give each layer product a packed copy for prefill when the model is small enough
        to hold its weights twice; whether it did."""
        linears = self._products()
        size = sum(lin.weight.nbytes for lin in linears)
        if (self.device.type != "cpu" or self.dtype != torch.float32 or size > PACK_LIMIT
                or not torch.backends.mkldnn.is_available()):
            return False
        return self._copies(linears, "packed", rows=2, tol=1e-4)

    def _pack_half(self) -> bool:
        """Give every product (LM head included) a half-precision copy, on a CPU whose torch
        has FBGEMM's fp16 kernel; whether it did."""
        if self.device.type != "cpu" or self.dtype != torch.float32:
            return False
        return self._copies([self.lm_head, *self._products()], "half", rows=1, tol=1e-2)

    def _copies(self, linears: list[_Linear], slot: str, rows: int, tol: float) -> bool:
        """Fill ``slot`` (``packed`` or ``half``) of every product with its extra copy and check
        the first layer's product on ``rows`` rows against the plain one. If this torch lacks
        the kernel (another CPU, another build) or the result disagrees, the slots are emptied
        again and the plain product serves. Whether the copies are in use."""
        make = _Linear.pack if slot == "packed" else _Linear.pack_half
        try:
            for lin in linears:
                make(lin)
            probe = torch.randn(rows, self.hidden, dtype=self.dtype)
            first = self.layers[0].qkv
            plain = F.linear(probe, first.weight.T if first.transposed else first.weight,
                             first.bias)
            if not torch.allclose(first(probe), plain, rtol=tol, atol=tol):
                raise RuntimeError(f"the {slot} product disagrees")
        except (RuntimeError, AttributeError, NotImplementedError):
            for lin in linears:
                setattr(lin, slot, None)
            return False
        return True

    # -- state

    def new_cache(self, length: int = 0) -> KVCache:
        size = max(GROW, -(-length // GROW) * GROW)
        shape = (len(self.layers), self.kv_heads, size, self.head_dim)
        return KVCache(torch.empty(shape, dtype=self.dtype, device=self.device),
                       torch.empty(shape, dtype=self.dtype, device=self.device))

    def _rope(self, length: int) -> None:
        """cos/sin for positions below ``length`` at least, from the model's rotary module."""
        if length <= self._cos.shape[0]:
            return
        length = max(length, 2 * self._cos.shape[0])
        probe = torch.empty(0, dtype=self.dtype, device=self.device)
        positions = torch.arange(length, device=self.device)[None]
        with torch.inference_mode():
            cos, sin = self._rotary(probe, positions)
        half = self.head_dim // 2
        self._cos = cos[0]  # (length, head_dim)
        self._sin_signed = torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)

    # -- forward

    @torch.inference_mode()
    def forward(self, ids: list[int], cache: KVCache, stop: StopFlag | None = None,
                background: bool = False) -> torch.Tensor:
        """Append ``ids`` to ``cache``; the logits (float32) after the last of them.

        Runs in chunks of :data:`CHUNK` tokens and checks ``stop`` before every layer (so
        ``background`` work, which llama.cpp runs on fewer threads, needs nothing more here).
        """
        logits = None
        for start in range(0, len(ids), CHUNK):
            logits = self._step(ids[start:start + CHUNK], cache, stop)
        assert logits is not None, "nothing to run"
        return logits

    def _step(self, ids: list[int], cache: KVCache, stop: StopFlag | None) -> torch.Tensor:
        n = len(ids)
        past = len(cache.ids)
        total = past + n
        cache.reserve(total)
        self._rope(total)
        cos = self._cos[past:total, None]  # (n, 1, head_dim): the same for every head
        sin = self._sin_signed[past:total, None]
        half = self.head_dim // 2
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        qk_heads = heads + kv_heads
        qk_size = self.q_size + self.kv_size
        mask = None
        if n > 1 and past:
            rows = torch.arange(past, total, device=self.device)[:, None]
            mask = torch.arange(total, device=self.device)[None, :] <= rows
        causal = n > 1 and not past
        eps, hidden, intermediate = self.eps, (self.hidden,), self.intermediate
        group, scale = heads // kv_heads, head_dim ** -0.5
        x = F.embedding(torch.tensor(ids, device=self.device), self.embed)  # (n, hidden)
        for layer, keys, values in zip(self.layers, cache.keys, cache.values, strict=True):
            if stop is not None and stop.is_set():
                raise Stopped
            qkv = layer.qkv(F.rms_norm(x, hidden, layer.norm1, eps))
            # Rotary embedding of queries and keys at once, (n, heads + kv_heads, head_dim):
            # q * cos + rotate_half(q) * sin, with rotate_half's sign folded into the table.
            qk = qkv[:, :qk_size].view(n, qk_heads, head_dim)
            qk = qk * cos + qk.roll(half, -1) * sin
            keys[:, past:total] = qk[:, heads:].transpose(0, 1)
            values[:, past:total] = qkv[:, qk_size:].view(n, kv_heads, head_dim).transpose(0, 1)
            if n == 1:  # one query: three small products beat the fused kernel's set-up
                scores = torch.bmm(qk[0, :heads].view(kv_heads, group, head_dim),
                                   keys[:, :total].transpose(1, 2)).mul_(scale)
                att = torch.bmm(scores.softmax(-1), values[:, :total]).view(1, -1)
            else:
                att = F.scaled_dot_product_attention(
                    qk[:, :heads].transpose(0, 1)[None], keys[None, :, :total],
                    values[None, :, :total], attn_mask=mask, is_causal=causal,
                    enable_gqa=True)[0].transpose(0, 1).reshape(n, -1)  # (n, heads * head_dim)
            x = x + layer.out(att)
            gate, up = layer.gate_up(F.rms_norm(x, hidden, layer.norm2, eps)).split(
                intermediate, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        cache.ids.extend(ids)
        last = F.rms_norm(x[-1:], hidden, self.final_norm, eps)
        return self.lm_head(last)[0].float()

    # -- decoding

    def pick(self, logits: torch.Tensor, seen: set[int], repetition_penalty: float) -> int:
        if repetition_penalty != 1.0 and seen:
            index = torch.tensor(list(seen), dtype=torch.long, device=logits.device)
            score = logits[index]
            logits[index] = torch.where(score < 0, score * repetition_penalty,
                                        score / repetition_penalty)
        return int(torch.argmax(logits))

    @torch.inference_mode()
    def greedy(self, prompt: list[int], cache: KVCache, max_new_tokens: int,
               eos: set[int], repetition_penalty: float = 1.0,
               stop: StopFlag | None = None, last: torch.Tensor | None = None) -> Iterator[int]:
        """New tokens after ``prompt`` (see :func:`engines.llm.decoding.greedy`); a stop is
        seen before every layer of a forward pass."""
        yield from decoding.greedy(self, prompt, cache, max_new_tokens, eos,
                                   repetition_penalty, stop, last)


def eos_ids(model: Any) -> set[int]:
    """The end-of-sequence ids ``generate`` would stop on."""
    return decoding.eos_ids(getattr(model, "generation_config", None), model.config)
