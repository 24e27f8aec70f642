"""Turn a GGUF file into a Hugging Face folder (safetensors + config + tokenizer + chat template).

Conversion dequantizes the weights once (to fp32) so that every later start is a plain
safetensors load. The folder is written under a temporary name and renamed into place, so an
interrupted conversion never leaves a half-written cache entry behind.
"""
from __future__ import annotations

import json
from pathlib import Path

from moe.atomic import atomic_folder
from moe.errors import CorruptModelError, ModelNotFoundError

MARKER = "spectutor-source.json"


def _check_gguf(path: Path) -> None:
    """Open the header and tensor table; raise CorruptModelError naming the file if unreadable."""
    import gguf

    if not path.is_file():
        raise ModelNotFoundError(f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(str(path))
        if not reader.tensors:
            raise ValueError("no tensors")
        end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    except Exception as exc:  # gguf raises ValueError, struct/numpy errors on bad or short files
        raise CorruptModelError(f"cannot read GGUF file {path}: {exc}") from exc
    if end > path.stat().st_size:
        raise CorruptModelError(f"GGUF file {path} is truncated: tensors end at byte {end}, file has {path.stat().st_size}")


def convert_gguf(path: Path, out_dir: Path) -> Path:
    """Convert `path` into `out_dir` (created atomically). Returns `out_dir`."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = path.resolve()
    _check_gguf(path)
    with atomic_folder(out_dir) as tmp:
        try:
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype="float32")
        except (OSError, ValueError, KeyError) as exc:
            raise CorruptModelError(f"cannot convert GGUF file {path}: {exc}") from exc
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)  # weights are dequantized: the folder is a plain checkpoint
        cfg.pop("_model_name_or_path", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
        if cfg.get("tie_word_embeddings"):
            tensors.pop("lm_head.weight", None)  # the head is the embedding; store it once
        save_file(tensors, str(tmp / "model.safetensors"))
        tok.save_pretrained(str(tmp))
        st = path.stat()
        (tmp / MARKER).write_text(json.dumps({"gguf": str(path), "size": st.st_size, "mtime": st.st_mtime}))
    return out_dir


def is_converted(out_dir: Path, path: Path) -> bool:
    """True when `out_dir` holds a finished conversion of this exact file (same size and mtime)."""
    marker = out_dir / MARKER
    if not marker.is_file():
        return False
    try:
        meta = json.loads(marker.read_text())
    except ValueError:
        return False
    st = path.stat()
    return meta.get("size") == st.st_size and meta.get("mtime") == st.st_mtime
