"""Model loading: hub id, local directory, or object-store prefix (downloaded once per node)."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a model is loaded: preflight and a finished re-run stay torch-free
    import torch


class ModelLoadError(RuntimeError):
    """The model cannot be found or loaded; the message names the model and what to do."""


def is_object_store(ref: str) -> bool:
    return "://" in ref and not ref.startswith("file://")


def model_cache_dir() -> Path:
    return Path(os.environ.get("FRAMESCRIBE_CACHE", Path.home() / ".cache" / "framescribe")) / "models"


def fetch_model_dir(uri: str, *, storage_options: dict | None = None) -> Path:
    """Copy an object-store model prefix to a local cache once; atomic rename so concurrent actors agree."""
    import fsspec

    from actors import s3_retry

    s3_retry.install()

    dest = model_cache_dir() / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    if (dest / "config.json").is_file():
        return dest
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    if not fs.exists(path.rstrip("/") + "/config.json"):
        raise ModelLoadError(f"model: {uri} has no config.json (expected a saved model directory)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=dest.parent))
    try:
        fs.get(path.rstrip("/") + "/", str(tmp), recursive=True)
        nested = tmp / Path(path.rstrip("/")).name  # some fsspec versions copy the folder itself
        src = nested if (nested / "config.json").is_file() and not (tmp / "config.json").is_file() else tmp
        try:
            os.rename(src, dest)
        except OSError:  # another actor on this node won the race
            if not (dest / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def resolve_model(ref: str, *, storage_options: dict | None = None) -> str:
    """Local directory or hub id to hand to `from_pretrained`; object-store prefixes are fetched first."""
    if ref.startswith("file://"):
        ref = ref[len("file://"):]
    if is_object_store(ref):
        return str(fetch_model_dir(ref, storage_options=storage_options))
    p = Path(ref).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"model: local path {str(p)!r} has no config.json (expected a saved model directory)")
        return str(p)
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise ModelLoadError(f"model: local path {ref!r} does not exist")
    return ref


def check_model_available(ref: str, *, revision: str | None = None, storage_options: dict | None = None) -> None:
    """Fail fast, before any cluster work, when the model cannot be had (offline hub, bad path)."""
    if is_object_store(ref):
        import fsspec

        fs, path = fsspec.core.url_to_fs(ref, **(storage_options or {}))
        try:
            ok = fs.exists(path.rstrip("/") + "/config.json")
        except Exception as e:  # credentials, endpoint: name the model and the reason
            raise ModelLoadError(f"model: cannot read {ref}: {type(e).__name__}: {e}") from None
        if not ok:
            raise ModelLoadError(f"model: {ref} has no config.json (expected a saved model directory)")
        return
    resolved = resolve_model(ref)
    if Path(resolved).exists():
        return
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(resolved, "config.json", revision=revision)
    except Exception as e:
        raise ModelLoadError(
            f"model: cannot get hub id {ref!r} ({type(e).__name__}); this machine may be offline or the id wrong. "
            f"Download it where the hub is reachable (e.g. `huggingface-cli download {ref} --local-dir DIR`) "
            f"and pass --model DIR, or set HF_HOME to a cache that holds it.") from None


def resolve_revision(ref: str, revision: str | None = None) -> str | None:
    """A hub model's revision as the commit it points to now (a branch or tag moves; rows and the labeling hash
    must name what was used). Local and object-store models: `revision` unchanged (it has no meaning there)."""
    if is_object_store(ref) or Path(resolve_model(ref)).exists():
        return revision
    from huggingface_hub import hf_hub_download

    try:  # the file lands in (or is read from, offline) HF_HOME/hub/models--org--name/snapshots/<commit>/
        return Path(hf_hub_download(ref, "config.json", revision=revision)).parent.name
    except Exception as e:
        raise ModelLoadError(f"model_revision: cannot resolve {revision or 'main'!r} of {ref!r} to a commit "
                             f"({type(e).__name__}: {e})") from None


def pick_device(device: str = "auto") -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device: 'cuda' requested but no GPU is visible to this worker")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_model(ref: str, *, revision: str | None = None, trust_remote_code: bool = False, dtype: str = "auto",
               device: str = "auto", attn_implementation: str | None = None,
               storage_options: dict | None = None):
    """(model, processor, device) ready for inference; trust_remote_code stays off unless asked."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    source = resolve_model(ref, storage_options=storage_options)
    dev = pick_device(device)
    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code)
    try:
        processor = AutoProcessor.from_pretrained(source, **kwargs)
        model = AutoModelForImageTextToText.from_pretrained(
            source, dtype=pick_dtype(dtype, dev), attn_implementation=attn_implementation, **kwargs)
    except OSError as e:
        raise ModelLoadError(f"model: cannot load {ref!r}: {e}. Pass a local directory with --model DIR.") from None
    return model.to(dev).eval(), processor, dev


def make_adapter(model, processor, *, skip_threshold: float | None = None):
    """The architecture's seam object (visual tokens out, spliced sequence in); `skip_threshold` turns on the
    vision skip of repeated temporal groups (actors.vision_skip), None encodes every group."""
    model_type = model.config.model_type
    if model_type == "qwen2_5_vl":
        from actors.qwen2_5_vl import Qwen25VLAdapter

        return Qwen25VLAdapter(model, processor, skip_threshold=skip_threshold)
    if model_type == "llava_onevision":
        from actors.llava_onevision import LlavaOneVisionAdapter

        return LlavaOneVisionAdapter(model, processor, skip_threshold=skip_threshold)
    raise ModelLoadError(f"model: architecture {model_type!r} is not supported (qwen2_5_vl, llava_onevision)")
