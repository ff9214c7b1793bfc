"""Answer video questions through the pipeline's own path and score them.

Everything goes through the same seam the labeling pipeline uses: `adapter.encode` (vision tower +
merger) → `prune_video` (any pruner) → `adapter.splice` (original M-RoPE positions) →
`greedy_generate` / `prefill_logits`. Two scores per question:

* greedy: the generated text, normalised, equals the answer (exact match);
* option log-likelihood: the option whose tokens (+ end of turn) the model finds most likely wins.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from actors.generation import SplicedSequence, greedy_generate, prefill_logits, stop_and_pad_ids
from actors.splice import EncodedVideo, PrunedVideo, PruneSpec, fastv_scores, prune_video


def normalize_answer(text: str | None) -> str:
    """Lowercase, collapse spaces, drop surrounding punctuation: 'Blue circle .' → 'blue circle'."""
    if text is None:
        return ""
    t = re.sub(r"\s+", " ", text.lower()).strip()
    t = re.sub(r"^[\s.,:;!?]+|[\s.,:;!?]+$", "", t)
    return re.sub(r"\s+([.,:;!?])", r"\1", t)


def match_option(text: str | None, options: list[str]) -> str | None:
    """The option a free-form answer names (exact after normalisation, else the unique option it contains)."""
    t = normalize_answer(text)
    norm = {normalize_answer(o): o for o in options}
    if t in norm:
        return norm[t]
    hits = [o for n, o in norm.items() if n and re.search(rf"(^|\W){re.escape(n)}($|\W)", t)]
    return hits[0] if len(hits) == 1 else None


class QAModel:
    """A loaded model + adapter with the pipeline's generation settings."""

    def __init__(self, model, processor, *, max_new_tokens: int = 8):
        from actors.loading import make_adapter

        self.model = model
        self.processor = processor
        self.adapter = make_adapter(model, processor)
        self.tokenizer = processor.tokenizer
        self.max_new_tokens = max_new_tokens
        self.eos_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")  # the end of turn an option must reach
        self.eos_ids, self.pad_id = stop_and_pad_ids(self.tokenizer, model.generation_config)

    @classmethod
    def load(cls, path: str, *, attn: str | None = None, max_new_tokens: int = 8) -> "QAModel":
        from actors.loading import load_model

        model, processor, _ = load_model(path, device="cpu", dtype="float32", attn_implementation=attn)
        return cls(model, processor, max_new_tokens=max_new_tokens)

    @torch.inference_mode()
    def encode(self, frames: list[np.ndarray], timestamps: list[list[float]]) -> list[EncodedVideo]:
        return self.adapter.encode(frames, timestamps)

    def prune(self, enc: EncodedVideo, spec: PruneSpec, prompt: str | None = None) -> PrunedVideo:
        scores = fastv_scores(self.model, self.adapter, enc, prompt) if spec.query_dependent else None
        return prune_video(enc, spec, self.adapter.language_model, attn_scores=scores)

    def splice(self, enc: EncodedVideo, pruned: PrunedVideo, prompt: str) -> SplicedSequence:
        return self.adapter.splice(enc, pruned, prompt)

    @torch.inference_mode()
    def generate(self, seqs: list[SplicedSequence], batch_size: int = 16) -> list[str]:
        out = []
        for s in range(0, len(seqs), batch_size):
            gen = greedy_generate(self.model, seqs[s:s + batch_size], max_new_tokens=self.max_new_tokens,
                                  eos_token_ids=self.eos_ids, pad_token_id=self.pad_id)
            out += self.tokenizer.batch_decode(gen.tokens, skip_special_tokens=True)
        return [t.strip() for t in out]

    @torch.inference_mode()
    def option_scores(self, seq: SplicedSequence, options: list[str]) -> list[float]:
        """Sum of log-probabilities of each option's tokens + end of turn, continuing after the prompt."""
        return self.option_scores_batch([(seq, options)])[0]

    @torch.inference_mode()
    def option_scores_batch(self, pairs: list[tuple[SplicedSequence, list[str]]], batch_size: int = 32
                            ) -> list[list[float]]:
        """`option_scores` for many (prompt sequence, options) pairs: each prompt is prefilled once (a KV cache,
        `batch_size` prompts at a time) and all its options continue from that cache in one batch, instead of
        one whole prefill per option (`option_scores_batch_full`, equal up to float rounding)."""
        scores: list[list[float]] = []
        for s in range(0, len(pairs), batch_size):
            scores += self._option_scores_cached(pairs[s:s + batch_size])
        return scores

    def _option_scores_cached(self, pairs: list[tuple[SplicedSequence, list[str]]]) -> list[list[float]]:
        from transformers import DynamicCache

        from actors.attention_bias import prefill_mask
        from actors.generation import left_pad, left_pad_key_bias, position_arg

        seqs = [seq for seq, _ in pairs]
        embeds, mask, positions = left_pad(seqs)
        dtype, device = embeds.dtype, embeds.device
        bias = left_pad_key_bias(seqs, embeds.shape[1], dtype)
        cache = DynamicCache(config=self.model.config.get_text_config())
        out = self.model(inputs_embeds=embeds, attention_mask=mask if bias is None else prefill_mask(mask, bias, dtype),
                         position_ids=position_arg(positions), cache=cache, use_cache=True, logits_to_keep=1)
        first = out.logits[:, -1].float().log_softmax(-1)  # (B, V): the last prompt token predicts ids[0]
        rows, targets = [], []
        for p, (_seq, options) in enumerate(pairs):
            for o in options:
                rows.append(p)
                targets.append(self.tokenizer(o, add_special_tokens=False)["input_ids"] + [self.eos_id])
        steps = max(len(t) for t in targets) - 1  # the option's tokens but the last are fed; right-padded
        scores: list[list[float]] = [[] for _ in pairs]
        if steps == 0:
            for p, ids in zip(rows, targets):
                scores[p].append(float(first[p, ids[0]]))
            return scores
        row_idx = torch.tensor(rows, device=device)
        cache.reorder_cache(row_idx)  # one copy of its prompt's cache per option
        fed = torch.full((len(rows), steps), self.pad_id, dtype=torch.long, device=device)
        for r, ids in enumerate(targets):
            fed[r, :len(ids) - 1] = torch.tensor(ids[:-1], device=device)
        emb = self.model.get_input_embeddings()(fed).to(dtype)
        prefix = mask[row_idx].bool()  # (R, L) real prompt keys
        neg = torch.finfo(dtype).min
        key_bias = (bias[row_idx] if bias is not None else torch.zeros(prefix.shape, dtype=dtype, device=device))
        prefix_part = torch.where(prefix, key_bias, torch.full_like(key_bias, neg))[:, None, :].expand(-1, steps, -1)
        causal = torch.zeros(steps, steps, dtype=dtype, device=device).masked_fill(
            torch.ones(steps, steps, dtype=torch.bool, device=device).triu(1), neg)
        attn = torch.cat([prefix_part, causal.expand(len(rows), -1, -1)], dim=2)[:, None]  # (R, 1, T, L + T)
        next_pos = positions.amax(dim=(0, 2)) + 1  # (B,): continue after the full sequence's last position
        pos = (next_pos[row_idx][:, None] + torch.arange(steps, device=device)[None]).unsqueeze(0)
        pos = pos.expand(positions.shape[0], -1, -1)
        logits = self.model(inputs_embeds=emb, attention_mask=attn, position_ids=position_arg(pos), cache=cache,
                            use_cache=True).logits.float().log_softmax(-1)  # (R, T, V)
        for r, (p, ids) in enumerate(zip(rows, targets)):
            total = first[p, ids[0]]
            if len(ids) > 1:
                nxt = torch.tensor(ids[1:], device=device)
                total = total + logits[r, :len(ids) - 1].gather(1, nxt[:, None]).sum()
            scores[p].append(float(total))
        return scores

    @torch.inference_mode()
    def option_scores_batch_full(self, pairs: list[tuple[SplicedSequence, list[str]]], batch_size: int = 32
                            ) -> list[list[float]]:
        """The reference for `option_scores_batch`: every (prompt + option) sequence prefilled whole."""
        emb = self.model.get_input_embeddings()
        seqs, targets, owner = [], [], []
        for p, (seq, options) in enumerate(pairs):
            next_pos = int(seq.positions.max()) + 1
            for o in options:
                ids = self.tokenizer(o, add_special_tokens=False)["input_ids"] + [self.eos_id]
                ids_t = torch.tensor(ids, device=seq.embeds.device)
                pos = torch.arange(next_pos, next_pos + len(ids), device=seq.positions.device)
                pos = pos.view(1, -1).expand(seq.positions.shape[0], -1)
                bias = None if seq.key_bias is None else torch.cat([seq.key_bias, seq.key_bias.new_zeros(len(ids) - 1)])
                seqs.append(SplicedSequence(embeds=torch.cat([seq.embeds, emb(ids_t[:-1]).to(seq.embeds.dtype)]),
                                            positions=torch.cat([seq.positions, pos[:, :-1]], dim=1), key_bias=bias))
                targets.append(ids)
                owner.append(p)
        scores: list[list[float]] = [[] for _ in pairs]
        for s in range(0, len(seqs), batch_size):
            logits = prefill_logits(self.model, seqs[s:s + batch_size]).float().log_softmax(-1)
            length = logits.shape[1]
            for b, ids in enumerate(targets[s:s + batch_size]):
                k = len(ids)
                # rows are right-aligned; position i predicts token i+1, so the last prompt token
                # (at length - k) predicts ids[0] and the last row predicts the end of turn
                lp = logits[b, length - k:]
                scores[owner[s + b]].append(float(lp.gather(1, torch.tensor(ids, device=lp.device)[:, None]).sum()))
        return scores


@dataclass
class QAItem:
    video: int            # index into the encoded videos
    prompt: str
    answer: str
    options: list[str]
    qtype: str = ""


def answer_items(qa: QAModel, encoded: list[EncodedVideo], items: list[QAItem], spec: PruneSpec, *,
                 loglik: bool = True, batch_size: int = 16) -> list[dict]:
    """Prune every video once (FastV once per question), answer every item; one result dict per item."""
    pruned_cache: dict[int, PrunedVideo] = {}
    seqs, pruned_of = [], []
    for it in items:
        enc = encoded[it.video]
        if spec.query_dependent:
            p = qa.prune(enc, spec, it.prompt)
        else:
            if it.video not in pruned_cache:
                pruned_cache[it.video] = qa.prune(enc, spec)
            p = pruned_cache[it.video]
        pruned_of.append(p)
        seqs.append(qa.splice(enc, p, it.prompt))
    texts = qa.generate(seqs, batch_size=batch_size)
    out = []
    all_scores = qa.option_scores_batch([(seq, it.options) for it, seq in zip(items, seqs)]) if loglik else None
    for i, (it, p, text) in enumerate(zip(items, pruned_of, texts)):
        row = {"qtype": it.qtype, "prompt": it.prompt, "answer": it.answer, "text": text,
               "correct": normalize_answer(text) == normalize_answer(it.answer),
               "kept": int(p.keep.numel()), "full": p.n_full, "residual": p.residual,
               "retention_used": p.retention_used}
        if loglik:
            pick = it.options[int(np.argmax(all_scores[i]))]
            row["loglik_pick"] = pick
            row["loglik_correct"] = pick == it.answer
        out.append(row)
    return out
