"""The `avx2` kernels: a hand-written fp32 product for the few rows that decoding and verification multiply.

A batch-1 decode step multiplies 1 row by every weight matrix, a verification forward 2-32 rows.
BLAS libraries are built for big products: on this project's AMD EPYC, MKL's and oneDNN's fp32
products at 2-8 rows cost 1.5-2x their 1-row cost although the weights, not the arithmetic,
dominate. `csrc/skinny_linear.cpp` reads each weight once per call and reuses it from L1 for every
row (see its header). It is compiled on first use with this CPU's flags (torch's C++ extension
builder, cached under torch's extensions folder) and only where the CPU has AVX2 and FMA.

Each output element is summed in the same order whatever the row count, so a row's product does not
depend on the rows sharing the call (attention still sums differently per width: a verification
forward's logits match one-token decoding to about 2e-5, not bit for bit). Products with more than
MAX_ROWS rows (prefill chunks, wide batches) and anything autograd records go to torch's default kernels.
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe.cpu_kernels import replace_modules

log = logging.getLogger(__name__)

MAX_ROWS = 48
"""Rows up to which the hand-written kernel runs; wider products are BLAS's ground. A batch of 16
with a few draft nodes each is 33-64 rows: there, on the Zen 4 EPYC (2 threads, 2026-12-07), the
whole forward took 114/127/141-143 ms at 33/40/48 rows on this kernel against 130/146/146-152 ms on
torch's (the cut had been at 32, and a step just past it cost a fifth more), tied at 56 (160 against
157-162) and lost at 64 (179-221 against 172-197 on torch's, 167 on oneDNN's)."""
SOURCE = Path(__file__).with_name("csrc") / "skinny_linear.cpp"


@functools.cache
def _loaded() -> tuple[object | None, str]:
    """(the compiled kernel module or None, why not); built once per process."""
    from moe.kernels import cpu_info

    missing = {"avx2", "fma"} - cpu_info()[1]
    if missing:
        why = "this CPU lacks " + ", ".join(sorted(missing))
    else:
        try:
            return _build(), ""
        except Exception as exc:  # no compiler, no headers: the other candidates still run
            why = f"building {SOURCE.name} failed: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r}"
    log.warning("the avx2 kernels are unavailable: %s", why)
    return None, why


def extension():
    """The compiled kernel module, or None (the reason is in `unavailable_reason()`)."""
    return _loaded()[0]


def _build():
    from torch.utils.cpp_extension import load

    if shutil.which("ninja") is None:  # the venv's ninja (a dependency) when the venv is not on PATH
        os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    return load(name="spectutor_skinny_linear", sources=[str(SOURCE)],
                extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)


def available() -> bool:
    return extension() is not None


def unavailable_reason() -> str:
    return _loaded()[1]


class SkinnyLinear(nn.Module):
    """An nn.Linear (the very same weight and bias tensors) whose few-row fp32 inference products run the avx2 kernel."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self._ext = extension()

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if (x.dtype == torch.float32 and x.device.type == "cpu" and x.numel() <= MAX_ROWS * self.in_features
                and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
            return self._ext.linear(x, w, self.bias)
        return F.linear(x, w, self.bias)


def use_skinny(model: nn.Module, min_out_features: int = 8) -> int:
    """Swap every contiguous fp32 CPU nn.Linear of `model` for a SkinnyLinear; returns how many (0 if unavailable)."""
    if not available():
        return 0

    def use(child: nn.Module) -> nn.Module | None:
        if (type(child) is nn.Linear and child.weight.dtype == torch.float32 and child.weight.device.type == "cpu"
                and child.weight.is_contiguous() and child.out_features >= min_out_features):
            return SkinnyLinear(child)
        return None

    return replace_modules(model, use)


def drop_skinny(model: nn.Module) -> int:
    """Swap every SkinnyLinear of `model` back for an nn.Linear holding the same tensors; returns how many."""

    def drop(child: nn.Module) -> nn.Module | None:
        if not isinstance(child, SkinnyLinear):
            return None
        linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
        linear.weight, linear.bias = child.weight, child.bias
        return linear

    return replace_modules(model, drop)
