"""Greedy decoding over a static KV cache: the decode loop made for a GPU (issue 16, item 3).

`greedy_generate` (actors.generation) grows a DynamicCache, a mask and a bias by concatenation and asks the
device "is every row done?" after each token. Here the cache (transformers' StaticCache), the 4-D float mask
(causal + padding + compensation bias) and the positions are allocated once per batch shape and updated in
place, so one decoding step has fixed shapes and addresses: it can be compiled (torch.compile; with
mode="reduce-overhead" a CUDA graph on a GPU). The host reads the device only every `eos_check_every` steps
(has every row ended?) and once at the end. Tokens equal `greedy_generate`'s (tests/test_static_decode.py);
steps run after a row's EOS feed the pad token, exactly as there, and are cut off the same way.
"""
from __future__ import annotations

import time

import torch

from actors.attention_bias import open_step_slot, static_key_row, static_prefill_mask
from actors.generation import (GenerationResult, SplicedSequence, greedy_generate, left_pad, left_pad_key_bias,
                               position_arg, sync_device, tokens_until_eos)

DEFAULT_EOS_CHECK_EVERY = 8
# the cache length is rounded up to a multiple of this, so batches of similar lengths share one compiled step
CACHE_BUCKET = 64


def cache_length(prompt_length: int, max_new_tokens: int, bucket: int = CACHE_BUCKET) -> int:
    """Slots for the prompt and every generated token but the last (it is never fed back), rounded up."""
    need = prompt_length + max(1, max_new_tokens - 1)
    return -(-need // bucket) * bucket


class StaticDecoder:
    """Greedy decoding with a static cache reused across batches of one shape; one per model (per actor)."""

    def __init__(self, model, *, compile_step: bool = False, eos_check_every: int = DEFAULT_EOS_CHECK_EVERY,
                 compile_mode: str | None = None):
        if eos_check_every < 1:
            raise ValueError(f"eos_check_every: must be >= 1, got {eos_check_every}")
        self.model = model
        self.eos_check_every = eos_check_every
        self.embed_tokens = model.get_input_embeddings()
        self._cache = None
        self._cache_key = None
        device = next(model.parameters()).device
        # CUDA graphs on a GPU (the per-step launch overhead is the point); plain inductor code on a CPU
        mode = compile_mode or ("reduce-overhead" if device.type == "cuda" else "default")
        self._step = torch.compile(self._plain_step, mode=mode, dynamic=False) if compile_step else self._plain_step
        self._mark_step = (torch.compiler.cudagraph_mark_step_begin
                           if compile_step and mode == "reduce-overhead" else (lambda: None))

    def _plain_step(self, tok: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(inputs_embeds=self.embed_tokens(tok)[:, None], attention_mask=mask,
                         position_ids=positions, cache=self._cache, use_cache=True)
        return out.logits[:, -1].argmax(-1)

    def cache_for(self, batch: int, length: int, dtype: torch.dtype, device: torch.device):
        """The static cache for this batch shape: reused (reset) when the shape repeats, so a compiled step
        keeps its graph and its buffers' addresses."""
        from transformers import StaticCache

        key = (batch, length, dtype, device)
        if self._cache_key != key:
            self._cache = StaticCache(config=self.model.config.get_text_config(), max_cache_len=length)
            if any(layer.is_sliding for layer in self._cache.layers):  # its keys would not match the mask's slots
                raise ValueError("decode_loop 'static' does not support sliding-window attention layers; "
                                 "use decode_loop 'dynamic'")
            self._cache_key = key
        else:
            self._cache.reset()
        return self._cache

    @torch.inference_mode()
    def generate(self, seqs: list[SplicedSequence], *, max_new_tokens: int, eos_token_ids: set[int],
                 pad_token_id: int, clock=time.perf_counter) -> GenerationResult:
        device = seqs[0].embeds.device
        embeds, pad_mask, positions = left_pad(seqs)
        batch, length = pad_mask.shape
        dtype = embeds.dtype
        slots = cache_length(length, max_new_tokens)
        cache = self.cache_for(batch, slots, dtype, device)
        key_row = static_key_row(pad_mask, left_pad_key_bias(seqs, length, dtype), slots, dtype)

        sync_device(device)
        t0 = clock()
        out = self.model(inputs_embeds=embeds, attention_mask=static_prefill_mask(key_row, length),
                         position_ids=position_arg(positions), cache=cache, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1)
        sync_device(device)
        t1 = clock()

        # every buffer of the loop, allocated once; the steps below only write into them
        step_mask = key_row[:, None, None, :].clone()
        step_pos = (positions.amax(dim=(0, 2)) + 1).view(1, -1, 1).repeat(positions.shape[0], 1, 1)  # (P, B, 1)
        tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        ended_at = torch.full((batch,), max_new_tokens, dtype=torch.long, device=device)  # step of each row's EOS
        eos = torch.tensor(sorted(eos_token_ids), dtype=torch.long, device=device)
        pad = torch.full_like(tok, pad_token_id)
        for step in range(1, max_new_tokens + 1):
            tok = torch.where(done, pad, tok)
            tokens[:, step - 1] = tok
            ended = torch.isin(tok, eos) & ~done
            ended_at.masked_fill_(ended, step)
            done |= ended
            if step == max_new_tokens:
                break
            if step % self.eos_check_every == 0 and bool(done.all()):  # the only host sync of the loop
                break
            open_step_slot(step_mask, length + step - 1)  # the slot this step's token is written to
            self._mark_step()
            tok = self._step(tok, step_mask, position_arg(step_pos))
            step_pos += 1
        sync_device(device)
        t2 = clock()
        new_tokens = int(ended_at.max())  # = the step at which the last row ended, as greedy_generate counts
        rows = tokens[:, :new_tokens].tolist()
        return GenerationResult(tokens=[tokens_until_eos(r, eos_token_ids) for r in rows],
                                prefill_ms=(t1 - t0) * 1e3, decode_ms=(t2 - t1) * 1e3, new_tokens=new_tokens)


def generate(model, seqs: list[SplicedSequence], *, max_new_tokens: int, eos_token_ids: set[int], pad_token_id: int,
             decoder: StaticDecoder | None = None, clock=time.perf_counter) -> GenerationResult:
    """Greedy decoding with `decoder` (the static loop) or, when None, the dynamic loop of actors.generation."""
    if decoder is None:
        return greedy_generate(model, seqs, max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids,
                               pad_token_id=pad_token_id, clock=clock)
    return decoder.generate(seqs, max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids,
                            pad_token_id=pad_token_id, clock=clock)
