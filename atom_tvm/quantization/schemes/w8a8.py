"""``w8a8``: INT8 weights per output channel, INT8 activations per token (dynamic), INT8 tensor cores.

The paper's W8A8 baseline (SmoothQuant-style numerics without smoothing, as the simulation's
``w8a8`` preset): every decoder Linear becomes `W8A8Linear`, which quantizes its float16 input per
token and runs `tir_kernels.dense_gemm.int8_gemm` (int32 sums, scaled by token x channel scales in
the epilogue, which also adds the residual for o_proj and down_proj). Norms, SiLU-mul, attention,
embeddings and lm_head stay float16, as in the simulation.

Weights are quantized at build time from the Hugging Face checkpoint, `formats.quantize_sym` with
one group per row (``.q8`` int8 ``[N, K]``, ``.s8`` float16 ``[N, 1]``). Activations: ``s =
f16(absmax * f32(1/127))``, codes ``clamp(rint(x * (1/s)), -128, 127)``, the formats' rounding, as a
TE op that TVM's pipeline may fuse with the producer and schedules (dlight on CUDA). It quantizes the
float16 value the norm or attention wrote (the simulation quantizes float32 values), and on CUDA
``1/s`` is nvcc's fast-math reciprocal, so a code can differ by one at a rounding tie.
(The fused norm/SiLU quantizers of `tir_kernels.quantize` do per-token INT8 only as Atom's outlier
block next to INT4 groups; their CUDA variants do not take an all-outlier split.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.target import Target

from atom_tvm.hf_weights import ParamSpec, iter_params
from atom_tvm.quantization import formats
from atom_tvm.quantization.schemes import (DecoderLinearMutator, QuantizationScheme, SchemeOptions,
                                           refuse_group_size, refuse_tensor_parallel, register)
from relax_models.kernel_calls import cached_kernel, out_tensor, rows
from relax_models.llama import LlamaConfig
from tir_kernels.dense_gemm import int8_gemm

_INT8_MAX = 127
_int8_gemm = cached_kernel(int8_gemm)


def quantize_per_token(x: te.Tensor) -> list[te.Tensor]:
    """TE: ``x [M, K]`` float16 -> (int8 codes ``[M, K]``, float16 scales ``[M, 1]``)."""
    m, k = x.shape
    red = te.reduce_axis((0, k), name="k")
    absmax = te.compute((m,), lambda i: te.max(te.abs(x[i, red].astype("float32")), axis=red), name="absmax")
    scale = te.compute((m, 1), lambda i, _: (absmax[i] * tirx.const(1.0 / _INT8_MAX, "float32")).astype("float16"),
                       name="scale")

    def code(i, j):
        s = scale[i, 0].astype("float32")
        recip = tirx.Select(s == tirx.const(0, "float32"), tirx.const(0, "float32"), tirx.const(1, "float32") / s)
        q = tirx.nearbyint(x[i, j].astype("float32") * recip)
        return tirx.max(tirx.min(q, tirx.const(_INT8_MAX, "float32")),
                        tirx.const(-_INT8_MAX - 1, "float32")).astype("int8")

    return [te.compute((m, k), code, name="codes"), scale]


class W8A8Linear(nn.Module):
    """``y = x W^T (+ residual)``: x float16 quantized per token, W int8 per output channel."""

    def __init__(self, in_features: int, out_features: int, target: Target):
        self.in_features, self.out_features, self.target = in_features, out_features, target
        self.q8 = nn.Parameter((out_features, in_features), "int8")
        self.s8 = nn.Parameter((out_features, 1), "float16")

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        flat, lead = rows(x)
        m, n = flat.shape[0], self.out_features
        xq, sx = op.tensor_expr_op(quantize_per_token, "quantize_per_token_int8", [flat])
        args = [xq, sx, self.q8, self.s8]
        if residual is not None:
            args.append(op.reshape(residual, (m, n)))
        kernel = _int8_gemm(self.target, n, self.in_features, residual is not None)
        y = op.tensor_ir_op(kernel, "int8_gemm", args, out=out_tensor((m, n), "float16"))
        return op.reshape(y, (*lead, n))


def quantize_weight(w: np.ndarray) -> dict[str, np.ndarray]:
    """A float weight ``[N, K]`` as the ``.q8``/``.s8`` parameters of `W8A8Linear`."""
    q, s = formats.quantize_sym(w, 8, w.shape[1])
    return {"q8": q, "s8": s}


class W8A8(QuantizationScheme):
    name = "w8a8"
    dtype = "float16"

    def mutate(self, model: nn.Module, cfg: LlamaConfig, target: Target) -> nn.Module:
        return DecoderLinearMutator(lambda k, n: W8A8Linear(k, n, target)).visit("", model)

    def params(self, model_dir: Path, expected: list[ParamSpec]) -> Iterator[tuple[str, np.ndarray]]:
        return iter_params(model_dir, expected, quantize_weight)

    def check_tensor_parallel(self, shards: int) -> None:
        refuse_tensor_parallel(self.name, shards)

    def to_json(self) -> dict:
        return {**super().to_json(), "weight": "int8 per output channel", "activation": "int8 per token"}


@register("w8a8")
def w8a8(model_dir: Path, cfg: LlamaConfig, options: SchemeOptions) -> W8A8:
    refuse_group_size("w8a8", options)
    return W8A8()
