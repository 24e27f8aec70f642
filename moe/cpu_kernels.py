"""Faster fp32 linear layers on CPUs: oneDNN with weights reordered once, instead of MKL's sgemm.

On the machines measured (bench/decode.py), MKL's fp32 matrix-vector path reaches a fraction of the
memory bandwidth and gets *slower* going from 1 to 2 rows, which is exactly the shape of a
speculative verification step. oneDNN with a prepacked weight runs the same products 1.5-3x faster.
bf16 already goes through oneDNN, so only fp32 weights are packed. Results differ from MKL's only
in summation order (about 1e-6 relative). Packing is for inference: the target never trains.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    """An nn.Linear whose forward reads a oneDNN-packed copy of the weight.

    Unless the weight is shared with another module (a tied embedding), the dense copy is
    dropped after packing so the weights are held once; `weight` then returns a dense copy.
    """

    def __init__(self, linear: nn.Linear, keep_dense: bool):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias
        self._packed = linear.weight.detach().to_mkldnn()
        self._dense = linear.weight if keep_dense else None

    @property
    def weight(self) -> Tensor:
        return self._dense if self._dense is not None else self._packed.to_dense()

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.float32:
            return nn.functional.linear(x, self.weight.to(x.dtype), self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")


def pack_linears(model: nn.Module, min_out_features: int = 8, keep_dense: bool = False) -> int:
    """Swap every fp32 CPU nn.Linear of `model` for a PackedLinear; returns how many were swapped.

    Inference only: packed weights take no gradients. Tiny projections (a 1-wide shared-expert
    gate) gain nothing and are left alone. `keep_dense` keeps every dense weight too, so that
    `unpack_linears` restores the very same tensors (moe/kernels.py times both and keeps one).
    """
    if not packing_available():
        return 0
    # Parameters also held by a module that is not a Linear (a tied embedding) stay dense.
    shared = {id(p) for m in model.modules() if not isinstance(m, nn.Linear) for p in m.parameters(recurse=False)}

    def pack(child: nn.Module) -> nn.Module | None:
        if (type(child) is nn.Linear and child.weight.dtype == torch.float32
                and child.weight.device.type == "cpu" and child.out_features >= min_out_features):
            return PackedLinear(child, keep_dense=keep_dense or id(child.weight) in shared)
        return None

    return replace_modules(model, pack)


def unpack_linears(model: nn.Module) -> int:
    """Swap every PackedLinear of `model` back for an nn.Linear (torch's default kernels); returns how many."""

    def unpack(child: nn.Module) -> nn.Module | None:
        if not isinstance(child, PackedLinear):
            return None
        linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
        dense = child._dense if child._dense is not None else child._packed.to_dense()
        linear.weight = dense if isinstance(dense, nn.Parameter) else nn.Parameter(dense, requires_grad=False)
        linear.bias = child.bias
        return linear

    return replace_modules(model, unpack)


def replace_modules(model: nn.Module, swap) -> int:
    """Put `swap(child)` in place of every submodule for which it returns a module; returns how many."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = swap(child)
            if new is not None:
                setattr(parent, name, new)
                swapped += 1
    return swapped
