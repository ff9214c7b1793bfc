"""Model attempts that died, remembered in storage so they survive the actor process.

Before a model actor labels a group of videos it writes one small object, `<root>/<uuid>.json`, holding the
group's video ids; when the group is done it deletes it. An object left behind therefore records one
attempt during which the process died (a codec or kernel crash, a CUDA fault, the OOM killer, a lost
node). The next attempt of the batch counts, per video, the objects that name it: a video in
`max_crashes` of them is not tried again (it gets `model_crash` rows), and a batch that crashed before is
labeled one video at a time, so a crash names exactly one video and the others of its batch get labeled.
The driver clears `root` at the start and the end of a run (see pipeline.run)."""
from __future__ import annotations

import json
import uuid
from typing import Any


class AttemptLedger:
    def __init__(self, root: str, storage_options: dict[str, Any] | None = None):
        import fsspec

        from actors import s3_retry

        s3_retry.install()

        self.root = root.rstrip("/")
        self.fs, self.path = fsspec.core.url_to_fs(self.root, **(storage_options or {}))

    def crashes(self, video_ids: list[str]) -> dict[str, int]:
        """video_id -> number of attempts that died with it in flight (only ids with at least one)."""
        wanted, counts = set(video_ids), {}
        self.fs.invalidate_cache(self.path)  # object stores list from a cache
        try:
            names = self.fs.glob(self.path.rstrip("/") + "/*.json")
        except FileNotFoundError:
            return {}
        for name in names:
            try:
                ids = json.loads(self.fs.cat_file(name))
            except (FileNotFoundError, ValueError):  # finished meanwhile, or written halfway by a dying process
                continue
            for vid in set(ids) & wanted:
                counts[vid] = counts.get(vid, 0) + 1
        return counts

    def begin(self, video_ids: list[str]) -> str:
        """Record an attempt on `video_ids`; returns its name for `end`."""
        name = f"{self.path.rstrip('/')}/{uuid.uuid4().hex}.json"
        self.fs.makedirs(self.path, exist_ok=True)
        self.fs.pipe_file(name, json.dumps(list(video_ids)).encode())
        return name

    def end(self, name: str) -> None:
        """The attempt finished (whatever its rows say): it no longer counts as a crash."""
        try:
            self.fs.rm_file(name)
        except FileNotFoundError:
            pass

    def clear(self) -> None:
        try:
            if self.fs.exists(self.path):
                self.fs.rm(self.path, recursive=True)
        except FileNotFoundError:
            pass
