"""Atomic trainer checkpoints: a folder is either whole under its final name or absent.

Layout of `state_dir`:
    CURRENT                 name of the newest complete checkpoint (replaced by rename)
    ckpt-<step>/state.json  counters, consumer positions, de-dup window, lineage versions, run ids
    ckpt-<step>/events.bin  the events still held in buffers and hold-outs (length-framed wire bytes)
    ckpt-<step>/<lineage>/  the student: model.safetensors + draft.json (save_draft) and optim.pt

Write order: everything into a temporary sibling, fsync every file, rename the folder, fsync the
parent, then replace CURRENT (write CURRENT.tmp, fsync, rename). A crash at any point leaves the
previous CURRENT pointing at a whole checkpoint. Loading checks each student's sha256 against
state.json, so a weights file changed or torn after the fact is refused, not trained on.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any, Iterator

from trainer.lineage import weights_sha256

_FRAME = struct.Struct("<I")


class CheckpointError(RuntimeError):
    """A checkpoint is missing a file or its weights do not match the recorded sha256."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*"), reverse=True):
        _fsync(p)
    _fsync(root)


def frame(records: list[bytes]) -> bytes:
    """Length-prefixed concatenation (for events.bin)."""
    return b"".join(_FRAME.pack(len(r)) + r for r in records)


def unframe(data: bytes) -> Iterator[bytes]:
    at = 0
    while at < len(data):
        (n,) = _FRAME.unpack_from(data, at)
        at += _FRAME.size
        if at + n > len(data):
            raise CheckpointError("events.bin is truncated")
        yield data[at: at + n]
        at += n


def begin(state_dir: Path, step: int) -> Path:
    """A fresh temporary folder to fill; `commit` makes it the current checkpoint."""
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / f".tmp-ckpt-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def commit(state_dir: Path, tmp: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write state.json into `tmp`, make it durable and current; prune older checkpoints."""
    (tmp / "state.json").write_text(json.dumps(state, sort_keys=True))
    _fsync_tree(tmp)
    final = state_dir / f"ckpt-{step:08d}"
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync(state_dir)
    pointer = state_dir / "CURRENT.tmp"
    pointer.write_text(final.name)
    _fsync(pointer)
    pointer.rename(state_dir / "CURRENT")
    _fsync(state_dir)
    olds = sorted(p for p in state_dir.glob("ckpt-*") if p != final)
    for old in olds[: max(0, len(olds) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in state_dir.glob(".tmp-ckpt-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def latest(state_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """(folder, state) of the current checkpoint, sha256-checked; None when there is none."""
    pointer = state_dir / "CURRENT"
    if not pointer.is_file():
        return None
    folder = state_dir / pointer.read_text().strip()
    try:
        state = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}: unreadable state.json: {exc}") from exc
    for name, info in state.get("lineages", {}).items():
        got = weights_sha256(folder / name)
        if got != info["student_sha256"]:
            raise CheckpointError(f"{folder / name}: weights sha256 {got} != recorded {info['student_sha256']}")
    return folder, state
