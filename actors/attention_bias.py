"""Per-key attention-logit biases (mass compensation) as the 4-D float masks HF attention takes.

Every place that turns a key bias into an attention mask lives here, so the decode loop only asks for
"the mask of this step". A 4-D mask is passed through by transformers' mask preparation as-is and added to
the attention logits by SDPA and eager attention (FlashAttention cannot take it: the adapters refuse it).
The mask = causal + padding + log m on the kept visual keys; with zero bias it equals the 2-D-mask path.
"""
from __future__ import annotations

import torch

BIAS_ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")


def check_bias_support(model) -> None:
    """Raise when the model's attention kernel cannot add a float mask to its logits."""
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    impl = getattr(text, "_attn_implementation", None) or impl
    if impl not in BIAS_ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"compensation bias needs attention that takes a float mask ({', '.join(BIAS_ATTENTION_IMPLEMENTATIONS)}); "
                         f"the model uses {impl!r}: load it with attn_implementation='sdpa'")


def padded_key_bias(biases: list[torch.Tensor | None], length: int, device, dtype=torch.float32) -> torch.Tensor | None:
    """(B, length) left-padded per-key biases, or None when no sequence carries one (the plain 2-D path)."""
    if all(b is None for b in biases):
        return None
    out = torch.zeros(len(biases), length, dtype=dtype, device=device)
    for i, b in enumerate(biases):
        if b is not None:
            out[i, length - b.shape[0]:] = b.to(device=device, dtype=dtype)
    return out


def _padding_and_bias(pad_mask: torch.Tensor, key_bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # (B, K): bias on real keys, the dtype's minimum on padding (finite: a fully masked row stays NaN-free)
    neg = torch.finfo(dtype).min
    return torch.where(pad_mask.bool(), key_bias.to(dtype), torch.full_like(key_bias, neg, dtype=dtype))


def prefill_mask(pad_mask: torch.Tensor, key_bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, L, L) float mask for a prefill with no cache: causal + padding + key bias."""
    length = pad_mask.shape[1]
    neg = torch.finfo(dtype).min
    keys = _padding_and_bias(pad_mask, key_bias, dtype)[:, None, None, :]  # (B, 1, 1, L)
    future = torch.ones(length, length, dtype=torch.bool, device=pad_mask.device).triu(1)
    return keys.masked_fill(future[None, None], neg).expand(-1, 1, length, length).contiguous()


def step_mask(pad_mask: torch.Tensor, key_bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, 1, K) float mask for one decoding step over cached keys + the new one (it sees them all)."""
    return _padding_and_bias(pad_mask, key_bias, dtype)[:, None, None, :]


def extend_key_bias(key_bias: torch.Tensor) -> torch.Tensor:
    """Append a zero bias for the key of the token generated this step."""
    return torch.cat([key_bias, key_bias.new_zeros(key_bias.shape[0], 1)], dim=1)


def static_key_row(pad_mask: torch.Tensor, key_bias: torch.Tensor | None, cache_len: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """(B, cache_len) additive mask over a static cache's slots: padding + bias on the first L (prompt) slots,
    the dtype's minimum on the slots not written yet (each decoding step opens one: `open_step_slot`)."""
    batch, length = pad_mask.shape
    bias = key_bias if key_bias is not None else torch.zeros(batch, length, dtype=dtype, device=pad_mask.device)
    row = torch.full((batch, cache_len), torch.finfo(dtype).min, dtype=dtype, device=pad_mask.device)
    row[:, :length] = _padding_and_bias(pad_mask, bias, dtype)
    return row


def static_prefill_mask(key_row: torch.Tensor, length: int) -> torch.Tensor:
    """(B, 1, L, cache_len) float mask for a prefill into a static cache: causal + padding + key bias."""
    cache_len = key_row.shape[1]
    future = torch.ones(length, cache_len, dtype=torch.bool, device=key_row.device).triu(1)
    return key_row[:, None, None, :].masked_fill(future[None, None], torch.finfo(key_row.dtype).min)


def open_step_slot(mask: torch.Tensor, slot: int) -> None:
    """Let every query see the key written to cache slot `slot` this step (bias 0: a generated token), in place."""
    mask[..., slot] = 0
