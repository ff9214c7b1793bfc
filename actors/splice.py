"""The pruning seam shared by both architectures: visual embeddings → K/V of an LLM layer → kept tokens.

Everything here sits between the vision tower (+ projector/merger) and the LLM; the architecture
files only say how to get visual embeddings out and how to build a prompt's full sequence.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from actors.generation import sync_device
from iwp import IWPSettings, PruneResult, TokenLayout, budget_for, prune_tokens, relative_residual


@dataclass
class EncodedVideo:
    """One video's visual tokens right after the vision tower + projector, before the LLM."""
    embeds: torch.Tensor                 # (N, D) prunable visual tokens, in sequence order
    layout: TokenLayout                  # temporal chunks (one per token group) and per-chunk grid
    meta: dict = field(default_factory=dict)  # architecture data needed to rebuild the sequence (grid_thw, ...)
    trailing: torch.Tensor | None = None # (E, D) tokens always kept after the visual block (LLaVA's newline)


@dataclass
class PrunedVideo:
    keep: torch.Tensor                   # (K,) sorted indices into the N visual tokens
    embeds: torch.Tensor                 # (K, D) embeddings to place at those tokens (merged for dycoke)
    n_full: int
    residual: float | None
    prune_ms: float
    retention_used: float


@dataclass
class PruneSpec:
    method: str = "none"
    retention: float = 1.0
    settings: IWPSettings = field(default_factory=IWPSettings)
    layer: int = 0
    max_residual: float | None = None    # quality guard: raise the budget until residual <= this
    max_retention: float = 1.0
    seed: int = 0

    @property
    def query_dependent(self) -> bool:
        return self.method == "fastv"


class VideoPromptIds:
    """Token ids of a chat prompt around one video; adapters set `tokenizer`, `processor`, `video_token_id`."""

    def prompt_ids(self, prompt: str) -> list[int]:
        """Chat-templated prompt with ONE video placeholder token (expanded per video later), cached."""
        cache = self.__dict__.setdefault("_prompt_ids", {})
        if prompt not in cache:
            messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            cache[prompt] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return cache[prompt]

    def full_input_ids(self, video: EncodedVideo, prompt: str) -> torch.Tensor:
        """The full, unpruned sequence: the placeholder repeated once per visual token (trailing ones too)."""
        ids = self.prompt_ids(prompt)
        i = ids.index(self.video_token_id)
        n = video.embeds.shape[0] + (0 if video.trailing is None else video.trailing.shape[0])
        return torch.tensor(ids[:i] + [self.video_token_id] * n + ids[i + 1:], device=video.embeds.device)


def layer_kv(language_model, embeds: torch.Tensor, layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-RoPE keys and values of decoder layer `layer` for visual embeddings: (N, H_kv, d) each.

    Only layer 0 is exact without running the full sequence: its input *is* the embeddings.
    """
    if layer != 0:
        raise NotImplementedError("iwp_layer > 0 needs the full sequence through earlier layers; only 0 is implemented")
    block = language_model.layers[layer]
    attn = block.self_attn
    h = block.input_layernorm(embeds.to(attn.k_proj.weight.dtype))
    head_dim = getattr(attn, "head_dim", None) or attn.k_proj.out_features // language_model.config.num_key_value_heads
    keys = attn.k_proj(h).view(embeds.shape[0], -1, head_dim)
    values = attn.v_proj(h).view(embeds.shape[0], -1, head_dim)
    return keys, values


@torch.inference_mode()
def prune_video(video: EncodedVideo, spec: PruneSpec, language_model, *, attn_scores: torch.Tensor | None = None
                ) -> PrunedVideo:
    """Select the visual tokens the LLM will see; exact budget ceil(retention * N)."""
    n = video.embeds.shape[0]
    device = video.embeds.device
    sync_device(device)
    t0 = time.perf_counter()
    if spec.method == "none":
        keep = torch.arange(n, device=device)
        sync_device(device)
        return PrunedVideo(keep, video.embeds, n, None, (time.perf_counter() - t0) * 1e3, 1.0)
    # K/V are cheap (one projection per token) and give every method a residual, not only IWP
    keys, values = layer_kv(language_model, video.embeds, spec.layer)
    generator = torch.Generator(device="cpu").manual_seed(spec.seed)
    retention = spec.retention
    while True:
        result: PruneResult = prune_tokens(spec.method, video.embeds, video.layout, budget_for(n, retention),
                                           keys=keys, values=values, attn_scores=attn_scores,
                                           settings=spec.settings, generator=generator)
        guard_ok = (spec.max_residual is None or result.residual is None or result.residual <= spec.max_residual)
        if guard_ok or retention >= spec.max_retention:
            break
        retention = min(spec.max_retention, retention * 1.5)  # quality guard: grow the budget geometrically
    keep = result.keep.to(device)
    embeds = result.embeds if result.embeds is not None else video.embeds[keep]
    sync_device(device)
    prune_ms = (time.perf_counter() - t0) * 1e3
    residual = result.residual
    if residual is None:  # a fidelity signal for every method, computed outside the timed selection
        residual = relative_residual(keys, values, keep, spec.settings)
    return PrunedVideo(keep, embeds.to(video.embeds.dtype), n, residual, prune_ms, retention)


@torch.inference_mode()
def fastv_scores(model, adapter, enc: EncodedVideo, prompt: str) -> torch.Tensor:
    """FastV: attention of the last prompt token to each visual token at LLM layer 2 (costs a full prefill;
    the model must be loaded with eager attention to return attention weights)."""
    from actors.generation import left_pad, position_arg

    n = enc.embeds.shape[0]
    full = PrunedVideo(torch.arange(n, device=enc.embeds.device), enc.embeds, n, None, 0.0, 1.0)
    embeds, mask, positions = left_pad([adapter.splice(enc, full, prompt)])
    out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_arg(positions),
                output_attentions=True, use_cache=False, logits_to_keep=1)
    layer = min(1, len(out.attentions) - 1)
    ids = adapter.full_input_ids(enc, prompt)
    video_idx = torch.nonzero(ids == adapter.video_token_id).squeeze(1)[:n]
    return out.attentions[layer][0, :, -1, video_idx].float().mean(0)
