"""KV-cached sampling for Llama-family students: the ``hf`` sampler's fast path.

``transformers``' ``generate`` spends most of a small model's decode step outside the model's
arithmetic (logits processors, stopping criteria, cache objects, mask building): at the demo
student's size this loop samples 1.3-1.8x as many tokens per second on one CPU core
(``benchmarks/bench_rollout_sampler.py``); on compute-bound models the two are even. The loop
reads the weights of the transformers model it is built from (fusing q/k/v and gate/up into one
matrix each), keeps a preallocated KV cache and samples with ``torch.multinomial`` from
``softmax(z / T)``, the distribution ``generate(do_sample=True, top_k=0, top_p=1)`` samples from.

Supported: ``llama`` and ``qwen2`` checkpoints with full attention, SiLU MLPs and a RoPE whose
angles depend on the position only (``supports``); anything else stays on ``generate``.
``tests/test_cached_decoder.py`` checks every logit against the transformers forward pass.
The layer arithmetic (``qkv``, ``attend``, ``logits``) is also the learner's forward pass that
computes each prompt once (``services.rollout.shared_prompt``); built outside inference mode, the fused
weights carry the gradient to the model's parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedModel

ARCHITECTURES = ("llama", "qwen2")
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")  # angles depend on the sequence length too


def supports(model: PreTrainedModel) -> bool:
    """Whether ``CachedDecoder`` computes what ``model``'s own forward pass computes."""
    c = model.config
    rope = (getattr(c, "rope_parameters", None) or {}).get("rope_type", "default")
    layer_types = getattr(c, "layer_types", None) or ["full_attention"]
    return (
        c.model_type in ARCHITECTURES
        and getattr(c, "hidden_act", None) == "silu"
        and rope not in _LENGTH_DEPENDENT_ROPE
        and all(t == "full_attention" for t in layer_types)
    )


def _fused(*linears: torch.nn.Linear) -> tuple[Tensor, Tensor | None]:
    """One (in, sum of outs) weight for several projections of the same input, and their bias."""
    weight = torch.cat([x.weight for x in linears]).t().contiguous()
    biases = [x.bias for x in linears]
    if all(b is None for b in biases):
        return weight, None
    return weight, torch.cat([b if b is not None else x.weight.new_zeros(x.out_features)
                              for b, x in zip(biases, linears, strict=True)])  # fmt: skip


@dataclass
class _Layer:
    ln1: Tensor  # (H,) input RMSNorm weight
    eps1: float
    qkv: Tensor  # (H, (heads + 2 kv_heads) * D)
    qkv_bias: Tensor | None
    o: Tensor  # (heads * D, H)
    o_bias: Tensor | None
    ln2: Tensor
    eps2: float
    gate_up: Tensor  # (H, 2 I)
    gate_up_bias: Tensor | None
    down: Tensor  # (I, H)
    down_bias: Tensor | None


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    out = x @ weight
    return out + bias if bias is not None else out


def _rms(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Llama's RMSNorm: normalised in float32, scaled in the input's dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding, "rotate half" layout. x: (B, h, T, D); cos, sin: (B, 1, T, D)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def causal_mask(real: Tensor) -> Tensor:
    """(N, 1, W, W) attention mask of rows whose real positions ``real`` (N, W) marks: each position
    attends to the real ones up to itself, and a padding position to itself only, so that no row
    of the attention is empty."""
    w = real.shape[1]
    causal = torch.ones((w, w), dtype=torch.bool, device=real.device).tril()
    return causal & (real[:, None, None, :] | torch.eye(w, dtype=torch.bool, device=real.device))


class CachedDecoder:
    """Samples continuations of left-padded prompts from a Llama-family model (see ``supports``)."""

    def __init__(self, model: PreTrainedModel) -> None:
        if not supports(model):
            kind = model.config.model_type
            raise ValueError(f"model: this {kind!r} config is not supported; see cached_decoder.supports")
        c, core = model.config, model.model
        self.heads, self.kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.embed = core.embed_tokens.weight
        self.padding_idx = core.embed_tokens.padding_idx  # the row that gets no gradient
        self.rotary = core.rotary_emb
        self.layers = [self._layer(block) for block in core.layers]
        self.norm, self.norm_eps = core.norm.weight, core.norm.variance_epsilon
        self.head = model.lm_head.weight.t()  # (H, V)

    @staticmethod
    def _layer(block: Any) -> _Layer:  # a transformers decoder layer
        a, m = block.self_attn, block.mlp
        qkv, qkv_bias = _fused(a.q_proj, a.k_proj, a.v_proj)
        gate_up, gate_up_bias = _fused(m.gate_proj, m.up_proj)
        return _Layer(
            block.input_layernorm.weight, block.input_layernorm.variance_epsilon, qkv, qkv_bias,
            a.o_proj.weight.t(), a.o_proj.bias, block.post_attention_layernorm.weight,
            block.post_attention_layernorm.variance_epsilon, gate_up, gate_up_bias,
            m.down_proj.weight.t(), m.down_proj.bias,
        )  # fmt: skip

    def qkv(self, layer: _Layer, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries (B, heads, T, D), keys and values (B, kv_heads, T, D) of ``x`` (B, T, H), rotated."""
        b, t, _ = x.shape
        h = _linear(_rms(x, layer.ln1, layer.eps1), layer.qkv, layer.qkv_bias)
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        q, k, v = h.split([q_size, kv_size, kv_size], -1)
        q = _rope(q.view(b, t, self.heads, self.head_dim).transpose(1, 2), cos, sin)
        k = _rope(k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2), cos, sin)
        return q, k, v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)

    def attend(self, layer: _Layer, x: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        """The rest of the decoder layer: ``x`` plus attention of ``q`` over ``k``/``v``, then the MLP."""
        b, t, _ = x.shape
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.heads != self.kv_heads)
        x = x + _linear(att.transpose(1, 2).reshape(b, t, -1), layer.o, layer.o_bias)
        gate, up = _linear(_rms(x, layer.ln2, layer.eps2), layer.gate_up, layer.gate_up_bias).chunk(2, -1)
        return x + _linear(F.silu(gate) * up, layer.down, layer.down_bias)

    def embed_ids(self, ids: Tensor) -> Tensor:
        """Input embeddings (..., H) of ``ids``, as the model's embedding layer computes them."""
        return F.embedding(ids, self.embed, self.padding_idx)

    def logits(self, x: Tensor) -> Tensor:
        """Logits (..., V) of the last layer's output ``x`` (..., H)."""
        return _rms(x, self.norm, self.norm_eps) @ self.head

    def _forward(self, ids: Tensor, rope: tuple[Tensor, Tensor], cache: tuple[Tensor, Tensor],
                 start: int, mask: Tensor) -> Tensor:  # fmt: skip
        """Logits of the last position of ``ids`` (B, T), the tokens at cache columns
        [start, start + T); their keys and values are written to the cache (L, B, kv_heads, S, D).
        ``mask`` (B, 1, T, start + T): which cached columns each new position may attend to."""
        end = start + ids.shape[1]
        x = self.embed_ids(ids)  # (B, T, H)
        for i, layer in enumerate(self.layers):
            q, k, v = self.qkv(layer, x, *rope)
            cache[0][i, :, :, start:end], cache[1][i, :, :, start:end] = k, v
            x = self.attend(layer, x, q, cache[0][i, :, :, :end], cache[1][i, :, :, :end], mask)
        return self.logits(x[:, -1])  # (B, V)

    @torch.inference_mode()
    def generate(self, ids: Tensor, mask: Tensor, max_new_tokens: int, temperature: float,
                 eos_token_id: int | None, pad_token_id: int,
                 repeats: int = 1) -> tuple[Tensor, Tensor]:  # fmt: skip
        """Sample up to ``max_new_tokens`` tokens after each left-padded row of ``ids`` (P, W), whose
        real tokens ``mask`` marks, ``repeats`` times: output rows p * repeats to (p + 1) * repeats - 1
        continue prompt p and share its prefill. Returns the new tokens (B, T), ``pad_token_id`` after a
        row's ``eos_token_id``, and the raw logits that predicted each (B, T, V) in float32; T
        stops short of ``max_new_tokens`` when every row has ended."""
        p, width = ids.shape
        total = width + max_new_tokens
        keys = torch.zeros(len(self.layers), p, self.kv_heads, total, self.head_dim,
                           dtype=self.embed.dtype, device=ids.device)  # fmt: skip
        cache = (keys, torch.zeros_like(keys))
        real = torch.ones((p, total), dtype=torch.bool, device=ids.device)
        real[:, :width] = mask.bool()
        positions = (real.long().cumsum(-1) - 1).clamp(min=0)  # each row counts from 0 at its first token
        cos, sin = self.rotary(keys, positions)  # (P, total, D)
        cos, sin = cos[:, None], sin[:, None]
        prefill = causal_mask(real[:, :width])
        logits = self._forward(ids, (cos[..., :width, :], sin[..., :width, :]), cache, 0, prefill)
        if repeats > 1:
            cache = (cache[0].repeat_interleave(repeats, 1), cache[1].repeat_interleave(repeats, 1))
            logits, real, cos, sin = (x.repeat_interleave(repeats, 0) for x in (logits, real, cos, sin))
        b = p * repeats
        tokens, steps = [], []
        done = torch.zeros(b, dtype=torch.bool, device=ids.device)
        for t in range(max_new_tokens):
            steps.append(logits.float())
            probs = torch.softmax(steps[-1] / temperature, dim=-1)
            token = torch.multinomial(probs, 1).masked_fill_(done[:, None], pad_token_id)  # (B, 1)
            tokens.append(token)
            if eos_token_id is not None:
                done |= token[:, 0] == eos_token_id
            if t + 1 == max_new_tokens or bool(done.all()):
                break
            col = width + t
            rope = (cos[..., col : col + 1, :], sin[..., col : col + 1, :])
            logits = self._forward(token, rope, cache, col, real[:, None, None, : col + 1])
        return torch.cat(tokens, 1), torch.stack(steps, 1)
