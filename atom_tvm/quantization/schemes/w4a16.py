"""``w4a16``: INT4 weights in groups (default 128 channels), float16 activations.

The paper's W4A16 baseline (the simulation's ``w4a16`` preset: round-to-nearest, no clipping).
Weights are quantized at build time from the Hugging Face checkpoint into the packed INT4 layout of
`atom_tvm.quantization.formats` without outliers (``.q4`` uint8 ``[N, K/2]``, ``.s4`` float16
``[N, K/G]``). Each decoder Linear becomes `W4A16Linear`: a TE op dequantizes the weight to float16
(``f16(f32(q) * f32(s))``, one rounding: relative error at most 2^-11, far below the INT4 step) and `tir_kernels.dense_gemm.fp16_gemm`
multiplies, adding the residual in its epilogue for o_proj and down_proj.

Why this split: the existing kernels are a dense fp16 x fp16 GEMM and the W4A4 GEMM, neither of
which reads INT4 weights against float16 activations. Dequantize-then-GEMM is exact and uses our
GEMM, but it writes and rereads the float16 weight on every call, so at decode (where the weight
bytes are the cost) it moves more bytes than fp16 itself; a GEMV that dequantizes in registers is
what would make w4a16 pay off at decode, and is not written yet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
from tvm import te
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.target import Target

from atom_tvm.errors import UserError
from atom_tvm.hf_weights import ParamSpec, iter_params
from atom_tvm.quantization import formats
from atom_tvm.quantize import check_sizes
from atom_tvm.quantization.schemes import (DecoderLinearMutator, QuantizationScheme, SchemeOptions,
                                           refuse_tensor_parallel, register)
from relax_models.kernel_calls import cached_kernel, out_tensor, rows
from relax_models.llama import LlamaConfig
from tir_kernels.dense_gemm import fp16_gemm

DEFAULT_GROUP_SIZE = 128
_fp16_gemm = cached_kernel(fp16_gemm)


def dequantize(q4: te.Tensor, s4: te.Tensor, group_size: int) -> te.Tensor:
    """TE: packed INT4 ``[N, K/2]`` and group scales ``[N, K/G]`` -> float16 ``[N, K]``."""
    n, half = q4.shape

    def value(i, j):
        byte = q4[i, j // 2].astype("int32")
        nibble = (byte >> ((j % 2) * 4)) & 15
        code = (nibble ^ 8) - 8  # sign-extend the 4-bit two's complement
        return (code.astype("float32") * s4[i, j // group_size].astype("float32")).astype("float16")

    return te.compute((n, half * 2), value, name="dequantize_int4")


class W4A16Linear(nn.Module):
    """``y = x W^T (+ residual)`` with W in INT4 groups of ``group_size``, x float16."""

    def __init__(self, in_features: int, out_features: int, group_size: int, target: Target):
        self.in_features, self.out_features, self.group_size, self.target = in_features, out_features, group_size, target
        self.q4 = nn.Parameter((out_features, in_features // 2), "uint8")
        self.s4 = nn.Parameter((out_features, in_features // group_size), "float16")

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        flat, lead = rows(x)
        m, n = flat.shape[0], self.out_features
        w = op.tensor_expr_op(lambda q, s: dequantize(q, s, self.group_size), "dequantize_int4", [self.q4, self.s4])
        args = [flat, w]
        if residual is not None:
            args.append(op.reshape(residual, (m, n)))
        kernel = _fp16_gemm(self.target, n, self.in_features, residual is not None)
        y = op.tensor_ir_op(kernel, "fp16_gemm", args, out=out_tensor((m, n), "float16"))
        return op.reshape(y, (*lead, n))


class W4A16(QuantizationScheme):
    name = "w4a16"
    dtype = "float16"

    def __init__(self, group_size: int):
        self.group_size = group_size

    def mutate(self, model: nn.Module, cfg: LlamaConfig, target: Target) -> nn.Module:
        return DecoderLinearMutator(lambda k, n: W4A16Linear(k, n, self.group_size, target)).visit("", model)

    def quantize_weight(self, w: np.ndarray) -> dict[str, np.ndarray]:
        """A float weight ``[N, K]`` as the ``.q4``/``.s4`` parameters of `W4A16Linear`."""
        packed = formats.quantize_atom_weight(w, self.group_size, n_outliers=0)
        return {"q4": packed.q4, "s4": packed.s4}

    def params(self, model_dir: Path, expected: list[ParamSpec]) -> Iterator[tuple[str, np.ndarray]]:
        return iter_params(model_dir, expected, self.quantize_weight)

    def check_tensor_parallel(self, shards: int) -> None:
        refuse_tensor_parallel(self.name, shards)

    def to_json(self) -> dict:
        return {**super().to_json(), "group_size": self.group_size, "weight": "int4 groups, round to nearest"}


@register("w4a16")
def w4a16(model_dir: Path, cfg: LlamaConfig, options: SchemeOptions) -> W4A16:
    group = options.group_size or DEFAULT_GROUP_SIZE
    try:
        check_sizes(cfg, group, 0)
    except UserError as err:
        raise UserError(f"--quantization w4a16: {err}") from None
    return W4A16(group)
