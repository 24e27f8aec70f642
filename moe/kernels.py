"""Which CPU kernels the lean decoder's linear layers run, chosen by timing them where they run.

Whether oneDNN-packed fp32 weights (moe/cpu_kernels.py) beat torch's default (MKL) kernels depends
on the CPU, the torch release and the thread count: packing won 1.4x on this project's AMD EPYC
and lost 0.75x on a Sapphire Rapids Xeon with a newer torch. So `kernels="auto"` times every lossless
candidate on the shapes the engine runs (a one-token decode step and verification widths up to 32,
after a real context) and keeps the fastest. A candidate whose fp32 logits move more than
PARITY_ATOL from the default kernels' is never chosen.

The verdict is cached per machine in $SPECTUTOR_HOME/kernels.json, keyed by the CPU model and
flags, torch version, thread count, dtype and the model's shapes, so each replica measures once.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from moe.config import ModelConfig

log = logging.getLogger(__name__)

KERNELS = ("auto", "default", "onednn", "avx2")
"""What `--kernels` accepts: auto (measure), or one candidate forced."""
CANDIDATES = ("default", "onednn", "avx2")
"""torch's own (MKL), oneDNN with prepacked weights (moe/cpu_kernels.py), the hand-written few-row
product (moe/skinny.py)."""
WIDTHS = (1, 2, 4, 8, 16, 32)
"""Tokens per forward timed: the decode step and the verification widths the engine uses."""
PARITY_ATOL = 1e-3
"""Largest |logit difference| from the default kernels a candidate may show (fp32); it is also the
tolerance of the packed path against transformers in tests/unit/test_parity.py."""
CONTEXT = 256
"""Committed tokens before the timed forwards, so attention reads a real context."""


@dataclass(frozen=True)
class KernelChoice:
    """The kernels a model runs and why."""

    kernels: str  # a CANDIDATES entry
    how: str  # "forced", "measured", "cached", or "only candidate" (non-fp32 or non-CPU weights)
    ms: dict[str, dict[int, float]] = dataclasses.field(default_factory=dict)  # candidate -> width -> ms
    max_diff: dict[str, float] = dataclasses.field(default_factory=dict)  # candidate -> |logits - default's|

    def speedup(self, candidate: str | None = None) -> float | None:
        """Geometric mean over widths of default's time / `candidate`'s (the winner by default)."""
        cand = candidate or self.kernels
        if "default" not in self.ms or cand not in self.ms:
            return None
        ratios = [self.ms["default"][w] / self.ms[cand][w] for w in self.ms["default"] if w in self.ms[cand]]
        return math.exp(sum(math.log(r) for r in ratios) / len(ratios)) if ratios else None

    def summary(self) -> str:
        s = f"kernels {self.kernels} ({self.how}"
        if self.ms:
            others = [f"{c} {self.speedup(c):.2f}x" for c in self.ms if c != "default"]
            s += "; vs default over widths " + ",".join(map(str, sorted(self.ms["default"]))) + ": " + ", ".join(others)
        rejected = [c for c, d in self.max_diff.items() if d > PARITY_ATOL]
        if rejected:
            s += "; refused for parity: " + ", ".join(f"{c} ({self.max_diff[c]:.1e})" for c in rejected)
        return s + ")"

    def as_dict(self) -> dict:
        return {"kernels": self.kernels, "how": self.how, "max_diff": self.max_diff,
                "ms": {c: {str(w): t for w, t in by_w.items()} for c, by_w in self.ms.items()}}

    @staticmethod
    def from_dict(d: dict, how: str) -> "KernelChoice":
        return KernelChoice(d["kernels"], how, {c: {int(w): t for w, t in by_w.items()} for c, by_w in d["ms"].items()},
                            dict(d["max_diff"]))


def check_kernels(value: str) -> str:
    if value not in KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, got {value!r}")
    return value


def available() -> list[str]:
    """The candidates this process can run (oneDNN needs torch's mkldnn ops, avx2 a CPU with AVX2 and a compiler)."""
    from moe import skinny
    from moe.cpu_kernels import packing_available

    ok = {"default": True, "onednn": packing_available(), "avx2": skinny.available()}
    return [c for c in CANDIDATES if ok[c]]


def apply(model: nn.Module, kernels: str, keep_dense: bool = False) -> None:
    """Put `model`'s linear layers on `kernels` (from the default kernels)."""
    if kernels == "onednn":
        from moe.cpu_kernels import pack_linears

        pack_linears(model, keep_dense=keep_dense)
    elif kernels == "avx2":
        from moe.skinny import use_skinny

        use_skinny(model)


def undo(model: nn.Module) -> None:
    from moe.cpu_kernels import unpack_linears
    from moe.skinny import drop_skinny

    unpack_linears(model)
    drop_skinny(model)


def running(model: nn.Module) -> str:
    """Which candidate `model`'s linear layers run now (a drafter next to the target follows the target's verdict)."""
    from moe.cpu_kernels import PackedLinear
    from moe.skinny import SkinnyLinear

    for m in model.modules():
        if isinstance(m, SkinnyLinear):
            return "avx2"
        if isinstance(m, PackedLinear):
            return "onednn"
    return "default"


def applicable(model: nn.Module) -> bool:
    """Only fp32 weights on the CPU have a choice; bf16 already runs oneDNN, GPUs run cuBLAS."""
    p = next(model.parameters())
    return p.dtype == torch.float32 and p.device.type == "cpu" and len(available()) > 1


def choose(model, kernels: str, cache: Path, timed: nn.Module | None = None, measurable: bool = True) -> KernelChoice:
    """Put `model` (a LeanDecoder, or a module around one passed as `timed`) on the right kernels.

    `timed` is the LeanDecoder whose forwards are timed; the kernels are applied to all of `model`.
    `cache` is the JSON file of earlier verdicts (moe.loader.kernel_cache()). A model whose forward
    needs other processes (expert parallelism: every forward is a collective) is not `measurable`
    alone: it takes the cached verdict for its shapes, else the default kernels.
    """
    check_kernels(kernels)
    decoder = timed if timed is not None else model
    if not applicable(model):
        return KernelChoice("default", "only candidate")
    if kernels != "auto":
        if kernels not in available():
            from moe import skinny

            why = skinny.unavailable_reason() if kernels == "avx2" else "torch lacks oneDNN's packed linear"
            raise ValueError(f"kernels {kernels!r} cannot run here: {why}")
        apply(model, kernels)
        return KernelChoice(kernels, "forced")
    key = machine_key(decoder.cfg, next(model.parameters()).dtype)
    known = _read(cache).get(key)
    if known is not None and known.get("kernels") in available():
        choice = KernelChoice.from_dict(known, "cached")
    elif not measurable:
        choice = KernelChoice("default", "not measured (its forward needs the other ranks)")
    else:
        choice = measure(model, decoder)
        _write(cache, key, choice)
        log.info("%s", choice.summary())
    apply(model, choice.kernels)
    return choice


def measure(model: nn.Module, decoder, widths: tuple[int, ...] = WIDTHS, rounds: int = 2,
            reps: int = 2) -> KernelChoice:
    """Time each candidate (ABAB rounds, best of `reps` per width) and pick the fastest that keeps parity.

    `model` comes back on the default kernels; `choose` applies the winner.
    """
    candidates = available()
    ms: dict[str, dict[int, float]] = {c: {} for c in candidates}
    diff: dict[str, float] = {}
    widths = tuple(w for w in widths if w < decoder.max_len) or (1,)
    n_context = max(1, min(CONTEXT, decoder.max_len - max(widths)))
    with torch.inference_mode():
        cache = decoder.new_cache(1, n_context + max(widths))
        slot = cache.allocate()
        gen = torch.Generator().manual_seed(0)
        vocab = decoder.cfg.vocab_size
        context = torch.randint(0, vocab, (n_context,), generator=gen).tolist()
        probe = torch.randint(0, vocab, (max(widths),), generator=gen).tolist()
        step = _forward(decoder, cache, slot)
        step(context)
        cache.commit([slot], [list(range(n_context))])
        reference = step(probe)
        for r in range(rounds):
            for cand in candidates:
                apply(model, cand, keep_dense=True)
                try:
                    if cand not in diff:
                        diff[cand] = float((step(probe) - reference).abs().max())
                    for w in widths:
                        if r == 0:
                            step(probe[:w])  # warm-up: first calls at a width pay for allocations
                        best = min(_timed(step, probe[:w]) for _ in range(reps))
                        ms[cand][w] = min(ms[cand].get(w, math.inf), best * 1e3)
                finally:
                    undo(model)
    timed = KernelChoice("default", "measured", ms, diff)
    winner = max((c for c in candidates if diff[c] <= PARITY_ATOL), key=lambda c: timed.speedup(c) or 0.0)
    return dataclasses.replace(timed, kernels=winner)


def _forward(decoder, cache, slot: int) -> Callable[[list[int]], torch.Tensor]:
    from moe.tree import TreeBatch

    return lambda tokens: decoder(TreeBatch.chains([tokens]), [slot], cache, logits_for="all")[0]


def _timed(step: Callable[[list[int]], torch.Tensor], tokens: list[int]) -> float:
    t0 = time.perf_counter()
    step(tokens)
    return time.perf_counter() - t0


def cpu_info() -> tuple[str, set[str]]:
    """The CPU's model name and instruction-set flags, from /proc/cpuinfo ("unknown" and none elsewhere)."""
    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, flags


def cpu_signature() -> str:
    """CPU model and the instruction-set flags kernels care about."""
    model, flags = cpu_info()
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")
    return model + " [" + " ".join(f for f in wanted if f in flags) + "]"


def machine_key(cfg: ModelConfig, dtype: torch.dtype) -> str:
    shapes = hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str).encode()).hexdigest()
    return (f"{cpu_signature()} | torch {torch.__version__} | {torch.get_num_threads()} threads | "
            f"{str(dtype).removeprefix('torch.')} | {cfg.model_type} {shapes[:16]} | {','.join(available())}")


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write(path: Path, key: str, choice: KernelChoice) -> None:
    """Add one verdict, atomically (replicas starting together each write whole files)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read(path)
        data[key] = {**choice.as_dict(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        fd, tmp = tempfile.mkstemp(prefix=".kernels.", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home: measure again next time, serve now
        log.warning("cannot cache the kernel choice in %s: %s", path, exc)
