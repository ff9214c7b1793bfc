"""Convert a multiple-choice video-QA benchmark layout to the `bench.eval_manifest` manifest format.

Output: one JSON object per line, `{"uri", "question", "options", "answer", "qtype", "id", ...}`, where
`answer` is the correct option's TEXT (letters are resolved) and `uri` is the video path under
`--video-root` (or left relative to the manifest with `--relative`).

Supported layouts:

* `mvbench`: MVBench-style task files, each a JSON list of
  `{"video": "166583.webm", "question": "...", "candidates": ["...", "..."], "answer": "..."}`
  (optionally `"start"`/`"end"` seconds for clips cut from a longer video). Pass one or more task files;
  `qtype` is the file's stem (the task name). The per-task video folder is `--video-root/<task>` if it
  exists, else `--video-root`.
* `videomme`: Video-MME-style rows (a JSON list, JSONL or Parquet) with `videoID`, `question_id`,
  `task_type`, `question`, `options` (`["A. ...", "B. ...", ...]`) and `answer` (a letter); videos are
  `--video-root/<videoID>.mp4`. The "A. " prefixes are stripped from the options.

    python -m bench.convert_mcq mvbench json/action_sequence.json json/object_shuffle.json \\
        --video-root /data/mvbench/video --out mvbench.jsonl
    python -m bench.convert_mcq videomme videomme/test.parquet --video-root /data/videomme/data --out vmme.jsonl
    python -m bench.eval_manifest mvbench.jsonl --model DIR --prompt-template \\
        "Question: {question} Options: {letters} Answer with the option's letter." --methods none,iwp

Per-question clip bounds (MVBench `start`/`end`) are kept as fields in the manifest; the pipeline samples
the whole video (its --start/--end apply to a whole run), so cut such clips beforehand if they matter.
"""
from __future__ import annotations

import json
import re
import string
from pathlib import Path

OPTION_PREFIX = re.compile(r"^\s*\(?([A-Za-z])[.):]\s+")


def _read_rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if isinstance(data, dict):  # {"id": {...}, ...} or {"data": [...]}
        data = data.get("data", list(data.values()))
    return list(data)


def _uri(root: Path | None, name: str, relative: bool) -> str:
    if root is None or relative:
        return name
    return str(root / name)


def convert_mvbench(files: list[Path], video_root: Path | None, relative: bool = False) -> list[dict]:
    out = []
    for f in files:
        task = f.stem
        root = video_root / task if video_root is not None and (video_root / task).is_dir() else video_root
        for i, row in enumerate(_read_rows(f)):
            options = [str(c) for c in row["candidates"]]
            answer = str(row["answer"])
            if answer not in options:
                raise ValueError(f"{f} item {i}: answer {answer!r} is not one of the candidates {options}")
            rec = {"uri": _uri(root, str(row["video"]), relative), "question": str(row["question"]).strip(),
                   "options": options, "answer": answer, "qtype": task, "id": f"{task}-{i}"}
            for k in ("start", "end"):
                if row.get(k) is not None:
                    rec[k] = row[k]
            out.append(rec)
    return out


def convert_videomme(files: list[Path], video_root: Path | None, relative: bool = False,
                     suffix: str = ".mp4") -> list[dict]:
    out = []
    for f in files:
        for i, row in enumerate(_read_rows(f)):
            raw = [str(o) for o in row["options"]]
            options = [OPTION_PREFIX.sub("", o, count=1).strip() for o in raw]
            letter = str(row["answer"]).strip().upper()
            if letter not in string.ascii_uppercase[:len(options)]:
                raise ValueError(f"{f} item {i}: answer {row['answer']!r} is not an option letter")
            rec = {"uri": _uri(video_root, f"{row['videoID']}{suffix}", relative),
                   "question": str(row["question"]).strip(), "options": options,
                   "answer": options[string.ascii_uppercase.index(letter)], "answer_letter": letter,
                   "qtype": str(row.get("task_type") or ""), "id": str(row.get("question_id") or f"{f.stem}-{i}")}
            for k in ("duration", "domain", "sub_category"):
                if row.get(k) is not None:
                    rec[k] = row[k]
            out.append(rec)
    return out


CONVERTERS = {"mvbench": convert_mvbench, "videomme": convert_videomme}


def write_manifest(rows: list[dict], out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="MVBench / Video-MME style multiple choice → eval manifest (.jsonl)")
    ap.add_argument("layout", choices=sorted(CONVERTERS))
    ap.add_argument("inputs", nargs="+", type=Path)
    ap.add_argument("--video-root", type=Path, default=None)
    ap.add_argument("--relative", action="store_true", help="keep video names relative (manifest next to videos)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    rows = CONVERTERS[a.layout](a.inputs, a.video_root, a.relative)
    write_manifest(rows, a.out)
    print(f"wrote {len(rows)} questions to {a.out}")


if __name__ == "__main__":
    main()
