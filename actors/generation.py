"""Batched prefill + greedy decoding over already-spliced sequences (embeddings + explicit positions).

The pruning seam hands us, per (video, prompt), the LLM input embeddings and the position ids each kept
token had in the *full* sequence. We left-pad them into one batch and run the LLM ourselves, so
decoding continues after each sequence's original maximum position (what `rope_deltas` does in
transformers), without patching the model.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from actors.attention_bias import extend_key_bias, padded_key_bias, prefill_mask, step_mask


@dataclass
class SplicedSequence:
    embeds: torch.Tensor     # (L, D) LLM input embeddings, visual tokens already pruned
    positions: torch.Tensor  # (P, L) position ids from the full sequence (P=3 for M-RoPE, 1 for 1-D RoPE)
    key_bias: torch.Tensor | None = None  # (L,) additive attention-logit bias per key (log m_i; 0 on text), or None


@dataclass
class GenerationResult:
    tokens: list[list[int]]
    prefill_ms: float
    decode_ms: float
    new_tokens: int


def sync_device(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer measures it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stop_and_pad_ids(tokenizer, generation_config=None) -> tuple[set[int], int]:
    """The token ids that end an answer (the tokenizer's EOS, the chat end-of-turn, the model's generation
    config) and the id used for padding: one definition, for production and evaluation alike."""
    eos = np.atleast_1d(getattr(generation_config, "eos_token_id", None) or []).tolist()
    ids = {i for i in [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"), *eos]
           if isinstance(i, int) and i >= 0}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(ids)
    return ids, pad


def left_pad(seqs: list[SplicedSequence]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(embeds (B,L,D), attention_mask (B,L), positions (P,B,L)) with padding on the left."""
    length = max(s.embeds.shape[0] for s in seqs)
    first = seqs[0]
    n_pos = first.positions.shape[0]
    embeds = first.embeds.new_zeros(len(seqs), length, first.embeds.shape[1])
    mask = torch.zeros(len(seqs), length, dtype=torch.long, device=first.embeds.device)
    positions = torch.zeros(n_pos, len(seqs), length, dtype=torch.long, device=first.embeds.device)
    for b, s in enumerate(seqs):
        n = s.embeds.shape[0]
        embeds[b, length - n:] = s.embeds
        mask[b, length - n:] = 1
        positions[:, b, length - n:] = s.positions.to(positions.device)
    return embeds, mask, positions


def position_arg(positions: torch.Tensor) -> torch.Tensor:
    # 1-D RoPE LLMs (LLaVA-OneVision's Qwen2) take (B, L); Qwen2.5-VL's M-RoPE takes (3, B, L)
    return positions[0] if positions.shape[0] == 1 else positions


def left_pad_key_bias(seqs: list[SplicedSequence], length: int, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, L) left-padded key biases of the batch, or None when no sequence carries one."""
    return padded_key_bias([s.key_bias for s in seqs], length, seqs[0].embeds.device, dtype)


@torch.inference_mode()
def prefill_logits(model, seqs: list[SplicedSequence]) -> torch.Tensor:
    """Logits of every position of the (left-padded) batch: what the equivalence tests compare."""
    embeds, mask, positions = left_pad(seqs)
    bias = left_pad_key_bias(seqs, embeds.shape[1], embeds.dtype)
    attn = mask if bias is None else prefill_mask(mask, bias, embeds.dtype)
    out = model(inputs_embeds=embeds, attention_mask=attn, position_ids=position_arg(positions), use_cache=False)
    return out.logits


@torch.inference_mode()
def greedy_generate(model, seqs: list[SplicedSequence], *, max_new_tokens: int, eos_token_ids: set[int],
                    pad_token_id: int, clock=time.perf_counter) -> GenerationResult:
    """`clock`: the timer for prefill_ms / decode_ms (benchmarks pass time.process_time on a shared CPU)."""
    from transformers import DynamicCache

    device = seqs[0].embeds.device
    embeds, mask, positions = left_pad(seqs)
    bias = left_pad_key_bias(seqs, embeds.shape[1], embeds.dtype)  # None: the plain 2-D mask path
    cache = DynamicCache(config=model.config.get_text_config())
    embed_tokens = model.get_input_embeddings()

    sync_device(device)
    t0 = clock()
    out = model(inputs_embeds=embeds, attention_mask=mask if bias is None else prefill_mask(mask, bias, embeds.dtype),
                position_ids=position_arg(positions), cache=cache, use_cache=True, logits_to_keep=1)
    next_tok = out.logits[:, -1].argmax(-1)
    sync_device(device)
    t1 = clock()

    next_pos = positions.amax(dim=(0, 2)) + 1  # (B,) decoding continues after the full sequence's last position
    done = torch.zeros(len(seqs), dtype=torch.bool, device=device)
    eos = torch.tensor(sorted(eos_token_ids), dtype=torch.long, device=device)  # once: a host→device copy per step syncs
    tokens: list[torch.Tensor] = []
    steps = 0
    for steps in range(1, max_new_tokens + 1):
        next_tok = torch.where(done, torch.full_like(next_tok, pad_token_id), next_tok)
        tokens.append(next_tok)
        done |= torch.isin(next_tok, eos)
        if bool(done.all()) or steps == max_new_tokens:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if bias is not None:  # every decoding step keeps the bias on the cached visual keys
            bias = extend_key_bias(bias)
        step_pos = next_pos.view(1, -1, 1).expand(positions.shape[0], -1, 1)
        out = model(inputs_embeds=embed_tokens(next_tok)[:, None],
                    attention_mask=mask if bias is None else step_mask(mask, bias, embeds.dtype),
                    position_ids=position_arg(step_pos), cache=cache, use_cache=True)
        next_tok = out.logits[:, -1].argmax(-1)
        next_pos = next_pos + 1
    sync_device(device)
    t2 = clock()

    stacked = torch.stack(tokens, dim=1).tolist() if tokens else [[] for _ in seqs]
    return GenerationResult(tokens=[tokens_until_eos(row, eos_token_ids) for row in stacked],
                            prefill_ms=(t1 - t0) * 1e3, decode_ms=(t2 - t1) * 1e3, new_tokens=steps)


def tokens_until_eos(row: list[int], eos_token_ids: set[int]) -> list[int]:
    """A row's generated tokens up to (without) its first end token."""
    for i, t in enumerate(row):
        if t in eos_token_ids:
            return row[:i]
    return row
