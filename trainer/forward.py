"""A plain causal forward with gradients for the draft (and, without gradients, the target).

B sequences, L padded length, D hidden, H query heads, Hkv key/value heads, hd head dim, V vocabulary.
`LeanDecoder.forward` is the inference path: inference mode, a KV cache, token trees. Training
needs whole right-padded sequences with autograd, so this reuses the decoder's own modules (the
same weights, norms, rotary tables and MLP/MoE blocks) with a causal mask and no cache. A test
checks that its logits equal the inference forward's.
"""
from __future__ import annotations

import torch
from torch import Tensor

from moe.layers import grouped_attention
from moe.model import LeanDecoder


def _attend(attn, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
    """The decoder layer's attention over the sequence itself; x [B, L, D], mask [B, 1, L, L]."""
    b, n, _ = x.shape
    q, k, v = attn.project(x, cos, sin)                                   # the inference path's own projection
    out = grouped_attention(q, k, v, mask)                                # [B, H, L, hd]
    return attn.o_proj(out.transpose(1, 2).reshape(b, n, attn.h * attn.hd))


def hidden_states(decoder: LeanDecoder, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Final-norm hidden states [B, L, D] of right-padded sequences (padding: attention_mask == 0).

    Positions are 0..L-1 (right padding leaves real tokens where they would be alone); a query sees
    the keys at or before it that are not padding. Padding rows come out finite but meaningless.
    """
    b, n = input_ids.shape
    dev = decoder.embed.weight.device
    if n > decoder.max_len:
        raise ValueError(f"sequence length {n} exceeds the model's max_len {decoder.max_len}")
    input_ids, attention_mask = input_ids.to(dev), attention_mask.to(dev).bool()
    positions = torch.arange(n, device=dev).expand(b, n)                  # [B, L]
    causal = torch.ones(n, n, dtype=torch.bool, device=dev).tril()       # [L, L]
    mask = causal[None] & attention_mask[:, None, :]                      # [B, L, L]
    mask = (mask | torch.eye(n, dtype=torch.bool, device=dev))[:, None]   # [B, 1, L, L]; a pad row sees itself
    window = decoder.cfg.sliding_window
    if window is not None:
        mask = mask & (positions[:, None, :, None] - positions[:, None, None, :] < window)
    cos, sin = decoder.rotary(positions, decoder.dtype)                   # [B, 1, L, hd]
    x = decoder.embed(input_ids)                                          # [B, L, D]
    for layer in decoder.layers:
        x = x + _attend(layer.attn, layer.input_norm(x), cos, sin, mask)
        out = layer.mlp(layer.post_norm(x))
        x = x + (out[0] if isinstance(out, tuple) else out)
    return decoder.norm(x)


def logits_at(decoder: LeanDecoder, hidden: Tensor) -> Tensor:
    """Head logits (fp32) of selected hidden states [..., D] -> [..., V or Vd]."""
    return decoder.lm_head(hidden).float()


def causal_logits(decoder: LeanDecoder, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Logits [B, L, V] at every position: the training twin of `decoder(tree, ..., logits_for="all")`."""
    return logits_at(decoder, hidden_states(decoder, input_ids, attention_mask))
