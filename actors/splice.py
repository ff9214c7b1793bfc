"""The pruning seam shared by both architectures: visual embeddings → K/V of an LLM layer → kept tokens.

Everything here sits between the vision tower (+ projector/merger) and the LLM; the architecture
files only say how to get visual embeddings out and how to build a prompt's full sequence.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from actors.generation import sync_device
from iwp import (IWPSettings, PruneResult, TokenLayout, assign_to_kept, budget_for, compensated_residual,
                 merged_embeddings, prune_tokens, relative_residual, uses_bias, uses_merge)
from iwp.compensation import check_compensation


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
    counts: torch.Tensor | None = None   # (K,) tokens each kept token stands for (mass compensation); None: no bias
    residual_ms: float = 0.0             # the fidelity residual computed after the selection (not in prune_ms)

    def key_bias(self) -> torch.Tensor | None:
        """(K,) additive attention-logit bias log m_i of the kept visual keys, or None without a bias."""
        return None if self.counts is None else self.counts.float().log()


@dataclass
class PruneSpec:
    method: str = "none"
    retention: float = 1.0
    settings: IWPSettings = field(default_factory=IWPSettings)
    layer: int = 0
    max_residual: float | None = None    # quality guard: raise the budget until residual <= this
    max_retention: float = 1.0
    seed: int = 0
    compensation: str = "none"           # none | bias | merge | bias+merge (iwp.compensation)
    compensation_assignment: str = "global"  # pruned tokens go to the most duplicated kept token: global | chunk

    def __post_init__(self) -> None:
        check_compensation(self.compensation, self.compensation_assignment)

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


def sequence_key_bias(pruned: PrunedVideo, kept_idx: torch.Tensor, keep_mask: torch.Tensor) -> torch.Tensor | None:
    """(L',) key bias of a spliced sequence: log m_i at the kept visual tokens (full-sequence indices
    `kept_idx`), 0 elsewhere, restricted to the kept positions `keep_mask`; None without compensation."""
    bias = pruned.key_bias()
    if bias is None:
        return None
    full = torch.zeros(keep_mask.shape[0], dtype=torch.float32, device=keep_mask.device)
    full[kept_idx] = bias.to(full.device)
    return full[keep_mask]


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
def prune_video(video: EncodedVideo, spec: PruneSpec, language_model, *, attn_scores: torch.Tensor | None = None,
                clock=time.perf_counter) -> PrunedVideo:
    """Select the visual tokens the LLM will see; exact budget ceil(retention * N). `clock` times prune_ms
    (selection, compensation and the guard) and residual_ms (the fidelity signal computed after them)."""
    n = video.embeds.shape[0]
    device = video.embeds.device
    sync_device(device)
    t0 = clock()
    if spec.method == "none":
        keep = torch.arange(n, device=device)
        sync_device(device)
        return PrunedVideo(keep, video.embeds, n, None, (clock() - t0) * 1e3, 1.0)
    # K/V are cheap (one projection per token) and give every method a residual, not only IWP
    keys, values = layer_kv(language_model, video.embeds, spec.layer)
    generator = torch.Generator(device="cpu").manual_seed(spec.seed)
    retention = spec.retention
    while True:
        result: PruneResult = prune_tokens(spec.method, video.embeds, video.layout, budget_for(n, retention),
                                           keys=keys, values=values, attn_scores=attn_scores,
                                           settings=spec.settings, generator=generator,
                                           with_residual=spec.compensation == "none")
        keep = result.keep.to(device)
        embeds = result.embeds if result.embeds is not None else video.embeds[keep]
        counts = owner = None
        if spec.compensation != "none":
            comp = assign_to_kept(keys, values, keep, spec.settings, video.layout, spec.compensation_assignment,
                                  duplication=result.duplication)
            counts, owner = (comp.counts, comp.owner) if uses_bias(spec.compensation) else (None, None)
            if uses_merge(spec.compensation):
                embeds = merged_embeddings(video.embeds, comp)
        residual = None
        if spec.max_residual is not None:  # the guard judges what the LLM will see (compensated or not)
            residual = _seen_residual(keys, values, keep, counts, owner, embeds, result, spec, language_model)
        if residual is None or residual <= spec.max_residual or retention >= spec.max_retention:
            break
        retention = min(spec.max_retention, retention * 1.5)  # quality guard: grow the budget geometrically
    sync_device(device)
    t1 = clock()
    if residual is None:  # a fidelity signal for every method, computed outside the timed selection
        residual = _seen_residual(keys, values, keep, counts, owner, embeds, result, spec, language_model)
    sync_device(device)
    return PrunedVideo(keep, embeds.to(video.embeds.dtype), n, residual, (t1 - t0) * 1e3, retention, counts,
                       residual_ms=(clock() - t1) * 1e3)


def _seen_residual(keys, values, keep, counts, owner, embeds, result: PruneResult, spec: PruneSpec,
                   language_model) -> float:
    """‖W − W_seen‖²/‖W‖² of what the LLM sees: kept tokens (merged when merging), weighted by their counts
    (`owner`: the kept token each token is counted in, for the sampled estimate of large videos)."""
    merged = uses_merge(spec.compensation) or result.embeds is not None
    if counts is None and not merged:
        if result.residual is not None:
            return result.residual
        return relative_residual(keys, values, keep, spec.settings)
    kept_keys, kept_values = layer_kv(language_model, embeds, spec.layer) if merged else (None, None)
    weights = counts if counts is not None else torch.ones(keep.numel(), device=keys.device)
    return compensated_residual(keys, values, keep, weights, kept_keys, kept_values, spec.settings, owner=owner)


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
