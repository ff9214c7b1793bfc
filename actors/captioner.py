"""`VideoCaptioner`: the stateful callable Ray Data runs on each model actor (model loaded once).

Input rows: one per video (decoded frames or an error). Output rows: one per (video, prompt).
Pruning is query-agnostic, so a video is encoded and pruned once and shared by all its prompts.
"""
from __future__ import annotations

import json
import os
import time
import traceback
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from actors.attempts import AttemptLedger
from actors.attention_bias import check_bias_support
from actors.generation import stop_and_pad_ids
from actors.loading import load_model, make_adapter
from actors.splice import PruneSpec, fastv_scores, prune_video
from actors.static_decode import DEFAULT_EOS_CHECK_EVERY, StaticDecoder, generate
from iwp import uses_bias

# Test hook: when set to a file path, the first model actor that reaches its second batch creates that
# file and exits at once (os._exit), as an actor killed by the OOM killer or a node failure would. The
# file guards it: while it exists no actor crashes again, so Ray's restart + task retry must finish the run.
CRASH_ONCE_ENV = "FRAMESCRIBE_TEST_ACTOR_CRASH_ONCE"


def _maybe_crash_for_test(calls: int) -> None:
    marker = os.environ.get(CRASH_ONCE_ENV)
    if not marker or calls < 2:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os._exit(1)


# Test hook: when set, a model actor exits its process (os._exit, like a codec/kernel crash or the OOM
# killer) whenever a video whose uri contains this substring is in the group it is about to label.
CRASH_ON_ENV = "FRAMESCRIBE_TEST_CRASH_ON"


def _maybe_crash_on(rows: list[dict]) -> None:
    needle = os.environ.get(CRASH_ON_ENV)
    if needle and any(needle in r["uri"] for r in rows):
        os._exit(1)


# Benchmark hook: when set to a file path, every model call appends one JSON line (pid, start and end in
# epoch seconds, rows in and out), so `framescribe bench pipeline` sees when the actor worked and when it waited.
BATCH_LOG_ENV = "FRAMESCRIBE_BATCH_LOG"


def _log_batch(started: float, rows_in: int, rows_out: int) -> None:
    path = os.environ.get(BATCH_LOG_ENV)
    if not path:
        return
    line = json.dumps({"pid": os.getpid(), "start": started, "end": time.time(), "rows_in": rows_in,
                       "rows_out": rows_out}) + "\n"
    try:
        with open(path, "a") as f:
            f.write(line)
    except OSError:
        pass  # a benchmark aid must never fail a batch


ROW_FIELDS = ("video_id", "uri", "prompt_id", "prompt", "text", "status", "error_type", "error_message", "retryable",
              "run_attempt", "pruner", "retention", "compensation", "retention_used", "visual_tokens_full",
              "visual_tokens_kept", "iwp_residual",
              "frames_sampled", "frame_timestamps", "duration_s", "fps", "width", "height", "decode_ms",
              "decoder", "vision_ms", "vision_groups", "vision_groups_encoded", "prune_ms", "prefill_ms",
              "generate_ms", "new_tokens", "kept_token_indices", "token_grid", "reference")


def frames_from_row(row: dict) -> np.ndarray:
    # bytearray: a writable buffer, so torch.from_numpy in the processor gets writable memory
    return np.frombuffer(bytearray(row["frames"]), dtype=np.uint8).reshape([int(x) for x in row["frames_shape"]])


def token_grid(video) -> list[int] | None:
    """[temporal groups, rows, columns] of a video's visual tokens (what `kept_token_indices` index into)."""
    if video.layout.grid_hw is None:
        return None
    return [video.layout.n_chunks, *video.layout.grid_hw]


class VideoCaptioner:
    def __init__(self, *, model: str, prune: PruneSpec, max_new_tokens: int = 64, batch_size: int = 4,
                 revision: str | None = None, trust_remote_code: bool = False, dtype: str = "auto",
                 device: str = "auto", storage_options: dict | None = None, row_defaults: dict | None = None,
                 attempts_root: str | None = None, attempts_storage_options: dict | None = None,
                 max_crashes: int = 2, skip_threshold: float | None = None, decode_loop: str = "dynamic",
                 compile_decode: bool = False, eos_check_every: int = DEFAULT_EOS_CHECK_EVERY):
        attn = "eager" if prune.query_dependent else None  # FastV reads attention weights
        self.model, self.processor, self.device = load_model(
            model, revision=revision, trust_remote_code=trust_remote_code, dtype=dtype, device=device,
            attn_implementation=attn, storage_options=storage_options)
        self.adapter = make_adapter(self.model, self.processor, skip_threshold=skip_threshold)
        if uses_bias(prune.compensation):
            check_bias_support(self.model)  # fail at actor start, not per batch
        self.prune = prune
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.row_defaults = row_defaults or {}
        # None: the dynamic loop (actors.generation); else the static-cache loop, its cache kept across batches
        self.decoder = (StaticDecoder(self.model, compile_step=compile_decode, eos_check_every=eos_check_every)
                        if decode_loop == "static" else None)
        self.eos_ids, self.pad_id = stop_and_pad_ids(self.processor.tokenizer, self.model.generation_config)
        self._calls = 0
        # attempts that died, kept in storage (None: no poison isolation, e.g. notebooks and benchmarks)
        self.ledger = AttemptLedger(attempts_root, attempts_storage_options) if attempts_root else None
        self.max_crashes = max_crashes

    # ---- Ray Data entry point ----
    def __call__(self, batch: pa.Table) -> pa.Table:
        self._calls += 1
        _maybe_crash_for_test(self._calls)
        started = time.time()
        rows = batch.to_pylist()  # Arrow → Python keeps nulls as None (numpy batches would make them NaN)
        out: list[dict] = []
        good = [r for r in rows if r["status"] == "ok"]
        for r in rows:
            if r["status"] != "ok":
                out += self._error_rows(r, r["error_type"], r["error_message"], retryable=r.get("retryable"))
        if good:
            out += self._label_guarded(good)
        table = pa.Table.from_pylist([{k: row.get(k) for k in (*ROW_FIELDS, *self.row_defaults)} for row in out])
        _log_batch(started, len(rows), table.num_rows)
        return table

    # ---- the work ----
    def _label_guarded(self, good: list[dict]) -> list[dict]:
        """Label `good`, remembering attempts in the ledger: videos in `max_crashes` attempts that killed
        the process get `model_crash` rows; after any crash the batch goes one video at a time."""
        if self.ledger is None:
            _maybe_crash_on(good)
            return self._label_or_error_rows(good)
        crashes = self.ledger.crashes([r["video_id"] for r in good])
        out: list[dict] = []
        rest = []
        for r in good:
            n = crashes.get(r["video_id"], 0)
            if n >= self.max_crashes:
                out += self._error_rows(r, "model_crash", f"the model process died in {n} attempts with this "
                                        f"video in its batch (model_retries={self.max_crashes}); not tried again",
                                        retryable=False)
            else:
                rest.append(r)
        groups = [[r] for r in rest] if crashes else ([rest] if rest else [])
        for group in groups:
            attempt = self.ledger.begin([r["video_id"] for r in group])
            _maybe_crash_on(group)
            out += self._label_or_error_rows(group)
            self.ledger.end(attempt)
        return out

    def _label_or_error_rows(self, good: list[dict]) -> list[dict]:
        try:
            return self.label_videos(good)
        except Exception:  # a batch failure must not hide which video broke: retry one by one
            pass
        out = []
        for r in good:
            for attempt in (1, 2):  # a failure that does not repeat was transient
                try:
                    out += self.label_videos([r])
                    break
                except Exception as e:
                    if attempt == 2:
                        out += self._error_rows(r, "model_error", f"{type(e).__name__}: {e} (failed twice)",
                                                detail=traceback.format_exc(limit=3), retryable=False)
        return out

    def label_videos(self, rows: list[dict]) -> list[dict]:
        frames = [frames_from_row(r) for r in rows]
        timestamps = [list(map(float, r["frame_timestamps"])) for r in rows]
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        encoded = self.adapter.encode(frames, timestamps)
        sync()
        vision_ms = (time.perf_counter() - t0) * 1e3 / len(rows)

        pairs = []  # (row, prompt_id, prompt, encoded, pruned)
        for r, enc in zip(rows, encoded):
            prompts = json.loads(r["prompts"])
            pruned = None if self.prune.query_dependent else prune_video(enc, self.prune, self.adapter.language_model)
            for pid, prompt in prompts:
                p = pruned or prune_video(enc, self.prune, self.adapter.language_model,
                                          attn_scores=fastv_scores(self.model, self.adapter, enc, prompt))
                pairs.append((r, pid, prompt, enc, p))

        out = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start:start + self.batch_size]
            seqs = [self.adapter.splice(enc, p, prompt) for (_, _, prompt, enc, p) in chunk]
            gen = generate(self.model, seqs, max_new_tokens=self.max_new_tokens, eos_token_ids=self.eos_ids,
                           pad_token_id=self.pad_id, decoder=self.decoder)
            texts = self.processor.tokenizer.batch_decode(gen.tokens, skip_special_tokens=True)
            for (r, pid, prompt, enc, p), text in zip(chunk, texts):
                out.append(self._row(r, pid, prompt, status="ok", text=text.strip(),
                                     visual_tokens_full=p.n_full, visual_tokens_kept=int(p.keep.numel()),
                                     kept_token_indices=p.keep.tolist(), token_grid=token_grid(enc),
                                     iwp_residual=p.residual, retention_used=p.retention_used,
                                     vision_ms=vision_ms, vision_groups=enc.layout.n_chunks,
                                     vision_groups_encoded=enc.meta.get("groups_encoded", enc.layout.n_chunks),
                                     prune_ms=p.prune_ms,
                                     prefill_ms=gen.prefill_ms / len(chunk), generate_ms=gen.decode_ms / len(chunk),
                                     new_tokens=gen.new_tokens))
        return out

    # ---- rows ----
    def _base(self, r: dict) -> dict:
        return {"video_id": r["video_id"], "uri": r["uri"], "pruner": self.prune.method,
                "retention": self.prune.retention, "compensation": self.prune.compensation, "frames_sampled": int(r.get("frames_sampled") or 0),
                "frame_timestamps": [float(x) for x in (r.get("frame_timestamps") if r.get("frame_timestamps") is not None else [])],
                "duration_s": r.get("duration_s"), "fps": r.get("fps"), "width": r.get("width"),
                "height": r.get("height"), "decode_ms": r.get("decode_ms"), "decoder": r.get("decoder"),
                "run_attempt": int(r.get("run_attempt") or 1), "reference": r.get("reference"), **self.row_defaults}

    def _row(self, r: dict, pid: str, prompt: str, **fields: Any) -> dict:
        return {**self._base(r), "prompt_id": pid, "prompt": prompt, "error_type": None, "error_message": None,
                **fields}

    def _error_rows(self, r: dict, error_type: str, message: str, detail: str | None = None,
                    retryable: bool | None = False) -> list[dict]:
        return [{**self._base(r), "prompt_id": pid, "prompt": prompt, "text": None, "status": "error",
                 "error_type": error_type, "error_message": message, "retryable": bool(retryable)}
                for pid, prompt in json.loads(r["prompts"])]
