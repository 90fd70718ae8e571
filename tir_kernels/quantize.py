"""Fused activation quantizers: the kernels that turn fp16 activations into Atom's W4A4 input.

Five kernels, each one pass over a row of tokens, each writing the Atom activation layout of
`atom_tvm.quantization.formats` (packed INT4 groups + one INT8 outlier block per token):

* `rmsnorm_quantize` - RMSNorm of the residual stream, then quantization: the input of the q/k/v
  and gate/up projections when the residual stream is stored in the quantizer's channel order
  (one order for every layer, `atom_tvm.quantization.reorder`'s "shared" residual order).
* `rmsnorm_reorder_quantize` - the same with the channel reorder between the two, for a residual
  stream in the model's own order and a permutation per layer (Atom's paper, "per-layer").
* `silu_mul_quantize` - SiLU(gate) * up of the fused gate_up GEMM output: the down_proj input.
  No reorder: down_proj's input permutation is folded into the gate/up weight rows offline, so
  the last O channels of ``gate_up[:, :I]`` and ``gate_up[:, I:]`` already are the outliers.
* `reorder_quantize` - reorder and quantize: the o_proj input when its outliers are moved to the
  end (a permutation of attention's output channels).
* `outlier_mask_quantize` - the o_proj input in attention's own channel order, in formats'
  masked-outlier layout: INT4 over all ``width`` channels with the outlier channels zeroed (a
  select on the bits of ``outlier_mask``, so an inf or NaN there cannot reach its group), and the
  outlier channels ``x[:, outliers]`` copied into the INT8 block. No reorder, so it streams.

Every kernel takes the token count M as a dynamic dimension and writes, destination-passing
style, ``q4 uint8 [M, (K-O)/2], s4 float16 [M, (K-O)/G], q8 int8 [M, O], s8 float16 [M, 1]``
(for `outlier_mask_quantize` K = width + O: its INT4 part is all ``width`` input channels).

Numerics (what the ``*_ref`` functions beside the kernels compute, operation by operation)
------------------------------------------------------------------------------------------
* All arithmetic is float32. The normalized / activated values are **not** rounded to float16
  before quantization: an unfused RMSNorm would round them, but the fused kernel never stores
  them, and rounding would only add error. The only float16 roundings are the scales, exactly
  as in `formats.quantize_atom_activation`, which the references call on the float32 values.
* RMSNorm: ``y = (x * rs) * w`` with ``rs = 1 / sqrt(ss / H + eps)``, ``ss`` the float32 sum of
  squares, every operation correctly rounded (LLVM's and numpy's ``/`` and ``sqrt``; on CUDA the
  ``__fdiv_rn``, ``__fsqrt_rn`` and ``__frcp_rn`` intrinsics, because TVM compiles with nvcc's
  ``--use_fast_math``, under which ``/`` and ``sqrt`` are approximate and ``1 / sqrt`` becomes
  ``rsqrtf``, 2 ulp off). Float addition is not
  associative, so the order of the sum is part of the contract: ``LANES`` = 128 lanes, lane
  ``l`` adds the squares of the 8-channel chunks ``l, l + 128, l + 256, ...`` in channel order,
  then the 128 lane sums are combined by an XOR butterfly (``v += v[lane ^ s]`` for s = 16, 8, 4,
  2, 1) within each warp of 32 lanes and the 4 warp sums by the same butterfly (s = 2, 1).
  That is how the CUDA kernel's 128 threads reduce; the CPU kernel and the reference replay it,
  so all three agree bit for bit. (``x * x`` is exact in float32 for float16 ``x``, so whether
  the compiler fuses it into an FMA with the running sum does not matter.)
* SiLU: ``y = (g / (1 + exp(-g))) * u``. The reference takes ``exp`` correctly rounded (float64
  exp rounded to float32) and divides exactly; the CPU kernel uses libm's ``expf`` (within about
  0.5 ulp) and IEEE division, the CUDA kernel ``__fdividef`` (within 2 ulp) and ``expf``, which
  TVM's ``--use_fast_math`` turns into ``__expf`` (within 2 + 1.2 |g| ulp). So these kernels may
  differ from the reference by a few float32 ulp in ``y``, which moves a code only where
  ``y * r`` lies within ~1e-6 (relative) of a rounding boundary, and a float16 scale by at most
  1 ulp where ``absmax * clip/qmax`` lies that close to a float16 rounding boundary.
  `reorder_quantize` and `outlier_mask_quantize` have no transcendental and match exactly.
* Scales: ``r = 1 / float32(scale)`` correctly rounded (``__frcp_rn`` on CUDA, see above).
* Codes: ``clamp(rint(y * r))`` as formats defines them, computed as ``bits(clamp(y * r) +
  1.5 * 2**23)`` (see `_code`): exact, and cheaper on a GPU than a round and a conversion. The
  CUDA kernels' INT4 codes round first (``bits(y * r + 1.5 * 2**23)``, the product kept out of
  an FMA) and are clamped and packed two at a time by ``cvt.pack.sat.s4`` (`_int4_nibbles`), the
  same codes: clamping commutes with rounding to integers.
* ``--use_fast_math`` also flushes float32 subnormals to zero; no value these kernels compute
  from float16 data is subnormal except a SiLU output below 1e-38, whose code is 0 either way.

Variants
--------
``cpu``: an LLVM build with the same numerics, one parallel task per token row; CI proves the
kernels' indexing, packing and rounding with it. ``cuda``: hand-written TIR with explicit
threads. Each thread owns 8 consecutive channels per step (one 16-byte fp16 load, one 4-byte
store of packed INT4), so an INT4 group of 64 / 128 channels is 8 / 16 consecutive lanes of one
warp and its absmax is a 3 / 4-step XOR shuffle; the outlier block's absmax and the RMSNorm sum
of squares are block reductions (warp shuffles, then the warp results through shared memory).
SiLU-mul, in-order RMSNorm and masked outliers: one block per row (256 threads; RMSNorm 128, the
LANES of its sum), straight from global memory into registers; the masked kernel also loads each
chunk's ``outlier_mask`` byte and gathers its INT8 block one float16 at a time from the row it
has just read (cache hits). The two reordering kernels: one block per tile of R rows, R = 3 for RMSNorm (1 above 6144 channels; `word_slots`)
in blocks of 128 threads (the LANES of the sum), R = 2 for reorder in blocks of 256
(`_REORDER_THREADS`). The block stages a tile in shared memory interleaved, one word per
channel holding that channel of every row (and of the RMSNorm weight), so that one gather
through the reorder index serves all R rows; see `_cuda_reorder_kernel` for why, and
`swizzled_word` for RMSNorm's bank layout.
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import tirx
from tvm.script import tirx as T

from atom_tvm.errors import UserError
from atom_tvm.quantization.formats import (
    GROUP_SIZES,
    AtomActivation,
    check_atom_split,
    masked_outliers,
    quantize_atom_activation,
)
from deploy.targets import make_target

__all__ = [
    "VARIANTS",
    "LANES",
    "rmsnorm_quantize",
    "rmsnorm_reorder_quantize",
    "silu_mul_quantize",
    "reorder_quantize",
    "outlier_mask_quantize",
    "rmsnorm_ref",
    "rmsnorm_quantize_ref",
    "rmsnorm_reorder_quantize_ref",
    "silu_mul_ref",
    "silu_mul_quantize_ref",
    "reorder_quantize_ref",
    "outlier_mask_quantize_ref",
    "output_shapes",
    "build",
]

VARIANTS = ("cpu", "cuda")
#: Lanes of the sum-of-squares reduction (= CUDA threads per token row); see the module docstring.
LANES = 128
#: Channels a lane handles per step: 16 bytes of fp16 in, 4 bytes of packed INT4 out.
VEC = 8
_WARP = 32
_WARPS = LANES // _WARP
_FULL_MASK = 0xFFFFFFFF
_INT4 = (-8, 7)
_INT8 = (-128, 127)
_ROUND_MAGIC = 1.5 * 2**23
_ROUND_MAGIC_BITS = 0x4B400000  # the float32 bits of _ROUND_MAGIC
#: Threads per row of the one-block-per-row kernels that have no sum of squares to order
#: (SiLU-mul, masked outliers).
_ROW_THREADS = 256
#: float16 slots per staged shared-memory word of the reordering CUDA kernels (rows per block,
#: plus w for RMSNorm), as measured best on the H200 at H = 4096 (docs/bench/quantize_kernels.md):
#: reorder 2 (two rows, 17 KiB of shared memory per block), RMSNorm 4 (three rows, amortizing
#: the per-row block reductions and square roots). Fewer slots mean more blocks per SM, more
#: rows share the gathers and the index reads; 8 lost for both (3 blocks per SM).
_SLOTS = {"reorder": 2, "rmsnorm": 4}
#: Staged rows beyond this many bytes per block take fewer slots (occupancy) ...
_STAGE_BYTES = 48 * 1024
#: ... down to 2, which may use up to this much (dynamic shared memory, which TVM's runtime grants
#: beyond the 48 KiB default; within the 99 KiB a block may have on sm_86/sm_89).
_MAX_STAGE_BYTES = 96 * 1024
#: Threads per block of the reorder kernel (RMSNorm's are the LANES of its sum). 256 rather than
#: 128: half the work per thread shortens a tile's latency chain (32 registers, 8 blocks per SM).
#: On an H100 it was as fast or faster at every size, 17-21% for decode rows, than 128 threads in
#: a grid capped at one wave of blocks walking the tiles (docs/bench/quantize_kernels.md, session
#: 11; not yet measured on an H200).
_REORDER_THREADS = 256


# ---------------------------------------------------------------------------------------------
# numpy references
# ---------------------------------------------------------------------------------------------


def _lane_sum_of_squares(x: np.ndarray) -> np.ndarray:
    """float32 row sums of ``x**2`` in the LANES-lane order of the module docstring."""
    x = np.asarray(x, np.float32)
    rows, k = x.shape
    chunks = k // VEC
    steps = -(-chunks // LANES)
    sq = np.zeros((rows, steps * LANES, VEC), np.float32)
    sq[:, :chunks] = (x * x).reshape(rows, chunks, VEC)
    sq = sq.reshape(rows, steps, LANES, VEC)
    # Padding chunks add +0.0, which leaves a float32 sum of squares unchanged.
    lanes = np.zeros((rows, LANES), np.float32)
    for step in range(steps):
        for e in range(VEC):
            lanes = lanes + sq[:, step, :, e]
    warps = _butterfly(lanes.reshape(rows, _WARPS, _WARP))[..., 0]
    return _butterfly(warps)[..., 0]


def _butterfly(v: np.ndarray) -> np.ndarray:
    """XOR-butterfly sum over the last axis (a power of two), as warp shuffles compute it."""
    n = v.shape[-1]
    lane = np.arange(n)
    step = n // 2
    while step:
        v = v + v[..., lane ^ step]
        step //= 2
    return v


def rmsnorm_ref(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """float32 RMSNorm ``(x * rs) * w`` in the original channel order, rounded as the kernels do."""
    x = np.asarray(x, np.float16).astype(np.float32)
    hidden = x.shape[-1]
    mean = _lane_sum_of_squares(x) / np.float32(hidden)
    rs = np.float32(1) / np.sqrt(mean + np.float32(eps))
    return (x * rs[:, None]) * np.asarray(weight, np.float16).astype(np.float32)


def rmsnorm_quantize_ref(
    x: np.ndarray, weight: np.ndarray, group_size: int, n_outliers: int, clip: float, eps: float,
) -> AtomActivation:
    """What `rmsnorm_quantize` writes: quantized ``rmsnorm_ref(x, weight)``."""
    return quantize_atom_activation(rmsnorm_ref(x, weight, eps), group_size, n_outliers, clip)


def rmsnorm_reorder_quantize_ref(
    x: np.ndarray, weight: np.ndarray, index: np.ndarray, group_size: int, n_outliers: int,
    clip: float, eps: float,
) -> AtomActivation:
    """What `rmsnorm_reorder_quantize` writes: quantized ``rmsnorm_ref(x, weight)[:, index]``."""
    y = rmsnorm_ref(x, weight, eps)[:, np.asarray(index)]
    return quantize_atom_activation(y, group_size, n_outliers, clip)


def silu_mul_ref(gate_up: np.ndarray) -> np.ndarray:
    """float32 ``(g / (1 + exp(-g))) * u`` with ``exp`` correctly rounded to float32."""
    gate_up = np.asarray(gate_up, np.float16).astype(np.float32)
    inter = gate_up.shape[-1] // 2
    g, u = gate_up[:, :inter], gate_up[:, inter:]
    with np.errstate(over="ignore"):  # exp(-g) = inf for g < -88 gives silu = -0, as on the GPU
        e = np.exp(-g.astype(np.float64)).astype(np.float32)
    return (g / (np.float32(1) + e)) * u


def silu_mul_quantize_ref(
    gate_up: np.ndarray, group_size: int, n_outliers: int, clip: float
) -> AtomActivation:
    """What `silu_mul_quantize` writes (up to the exp tolerance of the module docstring)."""
    return quantize_atom_activation(silu_mul_ref(gate_up), group_size, n_outliers, clip)


def reorder_quantize_ref(
    x: np.ndarray, index: np.ndarray, group_size: int, n_outliers: int, clip: float
) -> AtomActivation:
    """What `reorder_quantize` writes: quantized ``x[:, index]``."""
    y = np.asarray(x, np.float16).astype(np.float32)[:, np.asarray(index)]
    return quantize_atom_activation(y, group_size, n_outliers, clip)


def outlier_mask_quantize_ref(
    x: np.ndarray, outliers: np.ndarray, group_size: int, n_outliers: int, clip: float
) -> AtomActivation:
    """What `outlier_mask_quantize` writes: the quantized masked-outlier layout
    ``[x * keep, x[:, outliers]]`` of formats."""
    y = masked_outliers(np.asarray(x, np.float16).astype(np.float32), outliers)
    return quantize_atom_activation(y, group_size, n_outliers, clip)


def output_shapes(rows: int, k: int, group_size: int, n_outliers: int) -> list[tuple[tuple[int, ...], str]]:
    """Shapes and dtypes of the four outputs (q4, s4, q8, s8) for ``rows`` tokens of ``k`` channels."""
    normal = k - n_outliers
    return [
        ((rows, normal // 2), "uint8"),
        ((rows, normal // group_size), "float16"),
        ((rows, n_outliers), "int8"),
        ((rows, 1), "float16"),
    ]


# ---------------------------------------------------------------------------------------------
# Kernel generators
# ---------------------------------------------------------------------------------------------


def rmsnorm_quantize(
    hidden_size: int, group_size: int, n_outliers: int, clip: float, eps: float, variant: str = "cuda"
) -> tirx.PrimFunc:
    """``(x fp16 [M, H], weight fp16 [H], q4, s4, q8, s8)``: RMSNorm, quantize; ``x`` is already in
    the quantizer's channel order (the last O channels are the outliers), and so is ``weight``."""
    spec = _Spec("rmsnorm_inorder", hidden_size, group_size, n_outliers, clip, eps)
    return _generate(spec, variant)


def rmsnorm_reorder_quantize(
    hidden_size: int, group_size: int, n_outliers: int, clip: float, eps: float, variant: str = "cuda"
) -> tirx.PrimFunc:
    """``(x fp16 [M, H], weight fp16 [H], index int32 [H], q4, s4, q8, s8)``: RMSNorm, reorder
    (output channel j reads input channel ``index[j]``), quantize."""
    spec = _Spec("rmsnorm", hidden_size, group_size, n_outliers, clip, eps)
    return _generate(spec, variant)


def silu_mul_quantize(
    intermediate_size: int, group_size: int, n_outliers: int, clip: float, variant: str = "cuda"
) -> tirx.PrimFunc:
    """``(gate_up fp16 [M, 2I], q4, s4, q8, s8)``: SiLU(gate) * up (gate first, as LlamaMLP splits
    the fused gate_up_proj output), quantize; the last O channels are the outliers."""
    spec = _Spec("silu", intermediate_size, group_size, n_outliers, clip, 0.0)
    return _generate(spec, variant)


def reorder_quantize(
    hidden_size: int, group_size: int, n_outliers: int, clip: float, variant: str = "cuda"
) -> tirx.PrimFunc:
    """``(x fp16 [M, H], index int32 [H], q4, s4, q8, s8)``: reorder, quantize."""
    spec = _Spec("reorder", hidden_size, group_size, n_outliers, clip, 0.0)
    return _generate(spec, variant)


def outlier_mask_quantize(
    width: int, group_size: int, n_outliers: int, clip: float, variant: str = "cuda"
) -> tirx.PrimFunc:
    """``(x fp16 [M, width], outliers int32 [O], outlier_mask uint8 [width/8], q4, s4, q8, s8)``:
    formats' masked-outlier layout of ``x`` in its own channel order. INT4 over all ``width``
    channels, those whose bit is set in ``outlier_mask`` (`formats.outlier_mask` of ``outliers``)
    as 0; INT8 of ``x[:, outliers]`` in the order of ``outliers``. The outputs are
    ``output_shapes(M, width + O, group_size, O)``."""
    if not 0 <= n_outliers <= width:
        raise UserError(f"{n_outliers} outlier channels are not a subset of the {width} input "
                        f"channels; use --n-outliers between 0 and {width}")
    if group_size in GROUP_SIZES and width % group_size:
        working = [g for g in GROUP_SIZES if width % g == 0]
        fix = (f"use --group-size {working[0]}" if working else
               "quantize this input with its outliers moved to the end (reorder_quantize)")
        raise UserError(f"the masked-outlier layout puts all {width} input channels into INT4 "
                        f"groups, and {width} is not a multiple of group size {group_size}; {fix}")
    if n_outliers % VEC:
        raise UserError(f"{n_outliers} outlier channels make the layout's {width} + {n_outliers} "
                        f"channels no multiple of {VEC}; use --n-outliers "
                        f"{n_outliers + VEC - n_outliers % VEC}")
    spec = _Spec("masked", width + n_outliers, group_size, n_outliers, clip, 0.0)
    return _generate(spec, variant)


class _Spec:
    """The compile-time constants of one kernel, checked once."""

    def __init__(self, kind: str, k: int, group_size: int, n_outliers: int, clip: float, eps: float):
        check_atom_split(k, group_size, n_outliers)
        if k % VEC:
            raise UserError(f"channel count {k} is not a multiple of {VEC} (one 16-byte fp16 vector)")
        if not 0.0 < clip <= 1.0:
            raise UserError(f"clip ratio {clip} is outside (0, 1]")
        if kind.startswith("rmsnorm") and not eps > 0.0:
            raise UserError(f"RMSNorm eps must be positive, got {eps}")
        self.kind = kind
        self.clip = clip
        self.k = k
        self.group_size = group_size
        self.n_outliers = n_outliers
        self.normal = k - n_outliers
        # float32 constants rounded once in Python exactly as formats.symmetric_scale rounds them.
        self.c4 = float(np.float32(clip / _INT4[1]))
        self.c8 = float(np.float32(1.0 / _INT8[1]))
        self.eps = float(np.float32(eps))
        self.name = f"{kind}_quantize_k{k}_g{group_size}_o{n_outliers}"


def _generate(spec: _Spec, variant: str) -> tirx.PrimFunc:
    if variant == "cpu":
        func = _cpu_kernel(spec)
    elif variant == "cuda":
        func = _cuda_kernel(spec)
    else:
        raise UserError(f"unknown kernel variant {variant!r}: choose from {', '.join(VARIANTS)}")
    return func.with_attr("global_symbol", f"{spec.name}_{variant}")


def _match_outputs(q4, s4, q8, s8, rows, spec: _Spec):
    """The four output buffers of a kernel (`output_shapes`) for ``rows`` tokens."""
    return (
        T.match_buffer(q4, (rows, spec.normal // 2), "uint8"),
        T.match_buffer(s4, (rows, spec.normal // spec.group_size), "float16"),
        T.match_buffer(q8, (rows, spec.n_outliers), "int8"),
        T.match_buffer(s8, (rows, 1), "float16"),
    )


def build(func: tirx.PrimFunc, variant: str, archs: tuple[str, ...] = ("sm_90a",)):
    """Compile one kernel (or an IRModule of several) for its variant's target.

    CUDA builds go through nvcc into a fatbin for ``archs`` and work on a host without a GPU
    (see `atom_tvm.cuda_build`). Returns TVM's executable; call ``exe[func_name](*tensors)``.
    """
    from atom_tvm.cuda_build import compile_cuda

    if variant == "cpu":
        return tvm.compile(func, make_target("llvm", []))
    if variant != "cuda":
        raise UserError(f"unknown kernel variant {variant!r}: choose from {', '.join(VARIANTS)}")
    return compile_cuda(func, archs)


# ---------------------------------------------------------------------------------------------
# Shared scalar steps (TVMScript macros, inlined where they are used)
# ---------------------------------------------------------------------------------------------


def _scale(absmax, const: float):
    """float16(absmax * float32(clip / qmax))."""
    return T.Cast("float16", absmax * T.float32(const))


def _reciprocal_or_zero(scale, reciprocal):
    """What codes multiply by: the float16 scale's correctly rounded reciprocal, 0 for scale 0."""
    return T.Select(scale == T.float16(0), T.float32(0), reciprocal(T.Cast("float32", scale)))


@T.macro
def _scale_and_reciprocal(scale, recip, absmax, const, reciprocal):
    scale = _scale(absmax, const)
    recip = _reciprocal_or_zero(scale, reciprocal)


def _cpu_reciprocal(x):
    return T.float32(1) / x


def _cuda_reciprocal(x):
    """Correctly rounded 1 / x for 2**-126 <= |x| < 2**126, under any nvcc flags.

    TVM compiles with --use_fast_math, which turns a plain ``1.0f / x`` into the approximate
    MUFU.RCP (one ulp off for some scales, which moves codes that sit on a rounding tie).
    ``__frcp_rn`` is correct, but branches to a slow path for huge and tiny x, and those branches
    cut the quantizers' straight-line code, so the compiler can no longer overlap the rows' and
    chunks' latency chains. This is the fast path of ``__frcp_rn`` itself (the same SASS:
    MUFU.RCP, then one Newton step in FMAs), which ``__frcp_rn`` takes for exactly this range of x;
    every x here is in it: float16 scales (2**-24 .. 65504) and RMSNorm's sqrt(mean + eps).
    """
    approx = T.call_pure_extern("float32", "__fdividef", T.float32(1), x)
    error = T.call_pure_extern("float32", "__fmaf_rn", -x, approx, T.float32(1))
    return T.call_pure_extern("float32", "__fmaf_rn", approx, error, approx)


def _cuda_rms_reciprocal(sumsq, k: int, eps: float):
    """1 / sqrt(sumsq / k + eps) with each step correctly rounded under any nvcc flags
    (--use_fast_math would fold it into the approximate MUFU.RSQ)."""
    mean = T.call_pure_extern("float32", "__fdiv_rn", sumsq, T.float32(k))
    return _cuda_reciprocal(T.call_pure_extern("float32", "__fsqrt_rn", mean + T.float32(eps)))


def _code(value, recip, lo: int, hi: int):
    """int32 whose low bits are the two's-complement code clamp(rint(value * recip), lo, hi).

    Rounding is the float32 addition of 1.5 * 2**23: for |t| <= 2**22 the sum is the integer
    nearest to t, ties to even (the IEEE default mode, like formats' rint), held in the low
    mantissa bits, so ``bits(t + 1.5 * 2**23) = 0x4B400000 + rint(t)`` and the code is the low
    4 or 8 bits. Clamping first is the same as clamping the rounded value (lo, hi are integers)
    and bounds t. It replaces two quarter-rate conversions per element on the GPU (round and
    float-to-int) with one full-rate add, and is exact on every IEEE machine.
    """
    t = T.max(T.min(value * recip, T.float32(hi)), T.float32(lo))
    return T.reinterpret("int32", t + T.float32(_ROUND_MAGIC))


def _byte_perm(x, y, selector: int):
    """CUDA's __byte_perm (one PRMT): byte i of the result is byte ``selector`` nibble i of the
    8 bytes (x low, y high). (Used by the KV cache kernels.)"""
    return T.call_pure_extern("uint32", "__byte_perm", x, y, T.uint32(selector))


def _rounded_bits(value, recip):
    """uint32 ``bits(value * recip + 1.5 * 2**23)``: as in `_code`, rint(value * recip) sits in
    the low bits, here not clamped. The product is ``__fmul_rn``, which nvcc never contracts with
    the addition into one FFMA (that would round once, not as the reference does)."""
    product = T.call_pure_extern("float32", "__fmul_rn", value, recip)
    return T.reinterpret("uint32", product + T.float32(_ROUND_MAGIC))


#: cvt.pack.sat.s4.s32.b32 (one I2IP, sm_72 and later): ``odd`` and ``even`` saturated to INT4 in
#: the high and low nibble of the low byte, ``above`` shifted up 8 bits over them. TVM's T.ptx
#: table has no cvt.pack, so the kernels define it as a device function.
_PACK_S4X2 = """
__device__ __forceinline__ unsigned int atom_pack_s4x2(int odd, int even, unsigned int above) {
  unsigned int packed;
  asm("cvt.pack.sat.s4.s32.b32 %0, %1, %2, %3;" : "=r"(packed) : "r"(odd), "r"(even), "r"(above));
  return packed;
}
"""


def _int4_nibbles(bits):
    """Pack 8 INT4 codes from their unclamped `_rounded_bits` words into a uint32, code 2j in the
    low nibble of byte j.

    ``bits(t + 1.5 * 2**23) - bits(1.5 * 2**23)`` is rint(t) as an int32 (|t| <= 2**22, which
    `_int4_code_bound` checks), and cvt.pack.sat.s4 clamps two such codes to [-8, 7] and packs
    them into a byte, shifting the bytes packed so far up by 8: per 8 codes 8 IADD3 and 4 I2IP,
    where clamping pairs as 16-bit lanes and gathering their nibbles took 8 VIMNMX, 6 PRMT and 2
    more ALU operations (reorder_quantize 3-4% faster on an H100, docs/bench/quantize_kernels.md)."""
    codes = [T.reinterpret("int32", b) - T.int32(_ROUND_MAGIC_BITS) for b in bits]
    word = T.uint32(0)
    for j in (3, 2, 1, 0):  # the pair packed last lands in byte 0
        word = T.cuda.func_call("atom_pack_s4x2", codes[2 * j + 1], codes[2 * j], word,
                                source_code=_PACK_S4X2, return_type="uint32")
    return word


def _int4_code_bound(clip: float) -> float:
    """Largest |value * recip| an INT4 code of the CUDA kernels can see: ``absmax / scale``, where
    float16 rounding of ``absmax * clip / 7`` costs at most half a float16 subnormal step, so at
    most 1.5 times 7 / clip (a scale of 1.5 steps rounded down to 1)."""
    return 1.5 * _INT4[1] / clip * (1 + 2.0**-10)


def _unless_outlier(mask_byte, bit, value):
    """``value``, or 0 where bit ``bit`` of the ``outlier_mask`` byte is set: a select rather than
    a multiply by 0/1, so that an inf or NaN in an outlier channel cannot reach its INT4 group."""
    is_outlier = T.bitwise_and(T.Cast("int32", mask_byte), T.shift_left(T.int32(1), bit)) != 0
    return T.Select(is_outlier, T.float32(0), value)


def _silu(g):
    """g / (1 + exp(-g)) with IEEE division (the reference's operations)."""
    return g / (T.float32(1) + T.exp(-g))


def _silu_fast_div(g):
    """g / (1 + exp(-g)) with CUDA's 2-ulp `__fdividef` (a reciprocal and a multiply).

    The IEEE division is a dozen instructions with a slow-path check, and with it the
    SiLU kernel is bound by instruction issue rather than memory on an H200. The result stays
    within the exp tolerance of the module docstring; `__fdividef` returns 0 for a divisor
    above 2**126 (g < -87), where the exact quotient is below 1e-36 anyway.
    """
    return T.call_pure_extern("float32", "__fdividef", g, T.float32(1) + T.exp(-g))


# ---------------------------------------------------------------------------------------------
# cpu: one parallel task per row; values in a float32 row buffer, then quantized group by group
# ---------------------------------------------------------------------------------------------


def _cpu_kernel(spec: _Spec) -> tirx.PrimFunc:
    K, N, O, G = spec.k, spec.normal, spec.n_outliers, spec.group_size
    kind = spec.kind
    steps = -(-(K // VEC) // LANES)
    chunks = K // VEC
    c4, c8, eps = spec.c4, spec.c8, spec.eps

    @T.macro
    def butterfly(v, tmp, base, n):
        # v[base + l] += v[base + (l ^ s)] for s = n/2 .. 1, through tmp as the shuffle would.
        for s in range(int(math.log2(n))):
            for lane in range(n):
                tmp[lane] = v[base + lane] + v[base + T.bitwise_xor(lane, T.shift_right(n, s + 1))]
            for lane in range(n):
                v[base + lane] = tmp[lane]

    @T.macro
    def quantize_row(y, m, Q4, S4, Q8, S8):
        for g in range(N // G):
            amax: T.float32 = T.float32(0)
            for e in range(G):
                amax = T.max(amax, T.abs(y[g * G + e]))
            scale: T.float16 = T.float16(0)
            recip: T.float32 = T.float32(0)
            _scale_and_reciprocal(scale, recip, amax, c4, _cpu_reciprocal)
            S4[m, g] = scale
            for p in range(G // 2):
                lo = _code(y[g * G + 2 * p], recip, *_INT4)
                hi = _code(y[g * G + 2 * p + 1], recip, *_INT4)
                Q4[m, g * (G // 2) + p] = T.Cast("uint8", T.bitwise_or(
                    T.bitwise_and(lo, 15), T.shift_left(T.bitwise_and(hi, 15), 4)))
        if O > 0:
            amax8: T.float32 = T.float32(0)
            for j in range(O):
                amax8 = T.max(amax8, T.abs(y[N + j]))
            scale8: T.float16 = T.float16(0)
            recip8: T.float32 = T.float32(0)
            _scale_and_reciprocal(scale8, recip8, amax8, c8, _cpu_reciprocal)
            S8[m, 0] = scale8
            for j in range(O):
                Q8[m, j] = T.Cast("int8", _code(y[N + j], recip8, *_INT8))
        else:
            S8[m, 0] = T.float16(0)

    @T.macro
    def rms_reciprocal(X, m, rs):
        # rs[0] = 1 / rms of row m, replaying the CUDA reduction order: lane sums, warp
        # butterflies, block butterfly.
        lanes = T.decl_buffer((LANES,), "float32")
        tmp = T.decl_buffer((LANES,), "float32")
        for lane in range(LANES):
            acc: T.float32 = T.float32(0)
            for step in range(steps):
                if step * LANES + lane < chunks:
                    for e in range(VEC):
                        v = T.Cast("float32", X[m, (step * LANES + lane) * VEC + e])
                        acc = acc + v * v
            lanes[lane] = acc
        for w in range(_WARPS):
            butterfly(lanes, tmp, w * _WARP, _WARP)
        for w in range(_WARPS):
            lanes[w] = lanes[w * _WARP]
        butterfly(lanes, tmp, 0, _WARPS)
        rs[0] = T.float32(1) / T.sqrt(lanes[0] / T.float32(K) + T.float32(eps))

    if kind == "rmsnorm":

        @T.prim_func
        def cpu(x_h: T.handle, w_h: T.handle, idx_h: T.handle, q4_h: T.handle, s4_h: T.handle,
                q8_h: T.handle, s8_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            M = T.int64()
            X = T.match_buffer(x_h, (M, K), "float16")
            W = T.match_buffer(w_h, (K,), "float16")
            Idx = T.match_buffer(idx_h, (K,), "int32")
            Q4, S4, Q8, S8 = _match_outputs(q4_h, s4_h, q8_h, s8_h, M, spec)
            for m in T.parallel(M):
                rs = T.decl_buffer((1,), "float32")
                y = T.decl_buffer((K,), "float32")
                rms_reciprocal(X, m, rs)
                for j in range(K):
                    src = Idx[j]
                    y[j] = (T.Cast("float32", X[m, src]) * rs[0]) * T.Cast("float32", W[src])
                quantize_row(y, m, Q4, S4, Q8, S8)

    elif kind == "rmsnorm_inorder":

        @T.prim_func
        def cpu(x_h: T.handle, w_h: T.handle, q4_h: T.handle, s4_h: T.handle, q8_h: T.handle,
                s8_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            M = T.int64()
            X = T.match_buffer(x_h, (M, K), "float16")
            W = T.match_buffer(w_h, (K,), "float16")
            Q4, S4, Q8, S8 = _match_outputs(q4_h, s4_h, q8_h, s8_h, M, spec)
            for m in T.parallel(M):
                rs = T.decl_buffer((1,), "float32")
                y = T.decl_buffer((K,), "float32")
                rms_reciprocal(X, m, rs)
                for j in range(K):
                    y[j] = (T.Cast("float32", X[m, j]) * rs[0]) * T.Cast("float32", W[j])
                quantize_row(y, m, Q4, S4, Q8, S8)

    elif kind == "silu":

        @T.prim_func
        def cpu(gu_h: T.handle, q4_h: T.handle, s4_h: T.handle, q8_h: T.handle, s8_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            M = T.int64()
            GU = T.match_buffer(gu_h, (M, 2 * K), "float16")
            Q4, S4, Q8, S8 = _match_outputs(q4_h, s4_h, q8_h, s8_h, M, spec)
            for m in T.parallel(M):
                y = T.decl_buffer((K,), "float32")
                for j in range(K):
                    y[j] = _silu(T.Cast("float32", GU[m, j])) * T.Cast("float32", GU[m, K + j])
                quantize_row(y, m, Q4, S4, Q8, S8)

    elif kind == "masked":

        @T.prim_func
        def cpu(x_h: T.handle, outliers_h: T.handle, mask_h: T.handle, q4_h: T.handle,
                s4_h: T.handle, q8_h: T.handle, s8_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            M = T.int64()
            X = T.match_buffer(x_h, (M, N), "float16")
            Outliers = T.match_buffer(outliers_h, (O,), "int32")
            Mask = T.match_buffer(mask_h, (N // VEC,), "uint8")
            Q4, S4, Q8, S8 = _match_outputs(q4_h, s4_h, q8_h, s8_h, M, spec)
            for m in T.parallel(M):
                y = T.decl_buffer((K,), "float32")
                for j in range(N):
                    y[j] = _unless_outlier(Mask[j // VEC], j % VEC, T.Cast("float32", X[m, j]))
                for j in range(O):
                    y[N + j] = T.Cast("float32", X[m, Outliers[j]])
                quantize_row(y, m, Q4, S4, Q8, S8)

    else:

        @T.prim_func
        def cpu(x_h: T.handle, idx_h: T.handle, q4_h: T.handle, s4_h: T.handle, q8_h: T.handle,
                s8_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            M = T.int64()
            X = T.match_buffer(x_h, (M, K), "float16")
            Idx = T.match_buffer(idx_h, (K,), "int32")
            Q4, S4, Q8, S8 = _match_outputs(q4_h, s4_h, q8_h, s8_h, M, spec)
            for m in T.parallel(M):
                y = T.decl_buffer((K,), "float32")
                for j in range(K):
                    y[j] = T.Cast("float32", X[m, Idx[j]])
                quantize_row(y, m, Q4, S4, Q8, S8)

    return cpu


# ---------------------------------------------------------------------------------------------
# cuda: explicit thread blocks, values in registers, shuffles for the reductions
# ---------------------------------------------------------------------------------------------


def _shuffle_xor(value, lane_mask):
    return T.tvm_warp_shuffle_xor(T.uint32(_FULL_MASK), value, lane_mask, _WARP, _WARP)


def _packed_codes(vals, base, recip):
    """The 8 INT4 codes of ``vals[base:base + 8]`` packed into one uint32 (little endian: byte j
    = codes 2j, 2j+1), i.e. exactly 4 bytes of the q4 row."""
    return _int4_nibbles([_rounded_bits(vals[base + e], recip) for e in range(VEC)])


def _half(word, which):
    """float32 of the float16 in half ``which`` (0: low 16 bits, 1: high) of a uint32."""
    return T.Cast("float32", T.reinterpret("float16", T.Cast("uint16", T.shift_right(word, 16 * which))))


def _pair(low, high):
    """Two float16 as one uint32, ``low`` in the low 16 bits."""
    return T.bitwise_or(T.Cast("uint32", T.reinterpret("uint16", low)),
                        T.shift_left(T.Cast("uint32", T.reinterpret("uint16", high)), 16))


def _add(a, b):
    return a + b


@T.macro
def _warp_reduce(v, rows, width, combine):
    # XOR butterfly of v[0:rows] over aligned groups of `width` lanes: every lane ends with the
    # results. Each round shuffles every row, so the rows' shuffle latencies overlap.
    for s in T.unroll(int(math.log2(width))):
        for r in T.unroll(rows):
            v[r] = combine(v[r], _shuffle_xor(v[r], T.shift_right(width, s + 1)))


@T.macro
def _block_reduce(v, rows, part, tx, warps, combine):
    # v[r] for each of `rows` rows over the block: warp butterflies, the warp results through
    # shared memory, and the same butterfly over the `warps` results (the order the module
    # docstring states for the sum of squares). One barrier for all rows.
    _warp_reduce(v, rows, _WARP, combine)
    if tx % _WARP == 0:
        for r in T.unroll(rows):
            part[r * warps + tx // _WARP] = v[r]
    T.tvm_storage_sync("shared")
    for r in T.unroll(rows):
        v[r] = part[r * warps + tx % warps]
    _warp_reduce(v, rows, warps, combine)


def _max_u16x2(a, b):
    return T.call_pure_extern("uint32", "__vmaxu2", a, b)


def _magnitudes(word):
    """Both float16 of a uint32 with the sign bits cleared: as unsigned 16-bit integers they
    order as the magnitudes do (float16 bit patterns of non-negative values are monotonic)."""
    return T.bitwise_and(word, T.uint32(0x7FFF7FFF))


@T.macro
def _float_group_absmax(vals, amax, rows, group_lanes):
    # amax[r]: the absmax of vals[r * 8 : r * 8 + 8] over the group's lanes.
    for r in T.unroll(rows):
        amax[r] = T.float32(0)
        for e in T.unroll(VEC):
            amax[r] = T.max(amax[r], T.abs(vals[r * VEC + e]))
    _warp_reduce(amax, rows, group_lanes, T.max)


@T.macro
def _paired_group_absmax(words, amax, group_lanes):
    # amax[0], amax[1]: the group absmax of two rows whose float16 values come paired, row 0 in
    # the low half of each of the 8 words. The magnitudes' maximum is taken on both rows at once
    # in the integer domain (VIMNMX3.U16x2 takes three words, VIMNMX.U16x2 two, and one shuffle
    # carries both rows): 4 + 4 operations for the 16 values, where floats take 16 FMNMX and
    # 8 shuffles with 8 more.
    key = T.alloc_local((1,), "uint32")
    key[0] = _magnitudes(words[0])
    for e in T.unroll(1, VEC - 1, step=2):
        key[0] = T.call_pure_extern("uint32", "__vimax3_u16x2", key[0], _magnitudes(words[e]),
                                    _magnitudes(words[e + 1]))
    key[0] = _max_u16x2(key[0], _magnitudes(words[VEC - 1]))
    _warp_reduce(key, 1, group_lanes, _max_u16x2)
    amax[0] = _half(key[0], 0)
    amax[1] = _half(key[0], 1)


@T.macro
def _quantize_chunks(vals, amax, rows, chunk, chunk_valid, row0, M, Q4w, S4, group_lanes, c4,
                     hoist_codes):
    # One lane's 8 INT4 channels of each of `rows` rows (vals[r * 8 + e]), amax[r] their group's
    # absmax: scale, 4 bytes of codes. Each step runs for all rows before the next, in
    # straight-line code, so the rows' latency chains overlap. Only lanes with a valid chunk
    # and row store. With `hoist_codes` every lane computes its codes before the stores, which
    # are then predicated rather than branched around, and every lane of a group stores the
    # group's (identical) scale, one address per group; that is faster for the reordering
    # kernels, while SiLU-mul, which holds its whole row share in registers, would lose a
    # block per SM to the registers it costs (docs/bench/quantize_kernels.md).
    scale = T.alloc_local((rows,), "float16")
    recip = T.alloc_local((rows,), "float32")
    for r in T.unroll(rows):
        scale[r] = _scale(amax[r], c4)
        recip[r] = _reciprocal_or_zero(scale[r], _cuda_reciprocal)
    if hoist_codes:
        packed = T.alloc_local((rows,), "uint32")
        for r in T.unroll(rows):
            packed[r] = _packed_codes(vals, r * VEC, recip[r])
        for r in T.unroll(rows):
            if T.And(chunk_valid, row0 + r < M):
                Q4w[row0 + r, chunk] = packed[r]
                S4[row0 + r, chunk // group_lanes] = scale[r]
    else:
        for r in T.unroll(rows):
            if T.And(chunk_valid, row0 + r < M):
                Q4w[row0 + r, chunk] = _packed_codes(vals, r * VEC, recip[r])
                if chunk % group_lanes == 0:
                    S4[row0 + r, chunk // group_lanes] = scale[r]


@T.macro
def _quantize_outliers(ov, rows, row0, M, tx, threads, o_steps, Q8, S8, part, n_outliers, c8):
    # ov[step * rows + r]: outlier channel tx + step * threads of row row0 + r (0 past the end).
    amax8 = T.alloc_local((rows,), "float32")
    for r in T.unroll(rows):
        amax8[r] = T.float32(0)
        for step in T.unroll(o_steps):
            amax8[r] = T.max(amax8[r], T.abs(ov[step * rows + r]))
    _block_reduce(amax8, rows, part, tx, threads // _WARP, T.max)
    scale8 = T.alloc_local((rows,), "float16")
    recip8 = T.alloc_local((rows,), "float32")
    for r in T.unroll(rows):
        scale8[r] = _scale(amax8[r], c8)
        recip8[r] = _reciprocal_or_zero(scale8[r], _cuda_reciprocal)
    for r in T.unroll(rows):
        if row0 + r < M:
            for step in T.unroll(o_steps):
                if tx + step * threads < n_outliers:
                    Q8[row0 + r, tx + step * threads] = T.Cast(
                        "int8", _code(ov[step * rows + r], recip8[r], *_INT8))
            if tx == 0:
                S8[row0 + r, 0] = scale8[r]


def _cuda_kernel(spec: _Spec) -> tirx.PrimFunc:
    if _int4_code_bound(spec.clip) > 2**22:
        raise UserError(f"clip ratio {spec.clip} is too small for the CUDA kernels (their INT4 codes "
                        f"are rounded by adding 1.5 * 2**23, exact up to 2**22): use a clip ratio "
                        f"of at least 1e-5")
    if spec.kind == "silu":
        return _cuda_silu_kernel(spec)
    if spec.kind == "rmsnorm_inorder":
        return _cuda_rmsnorm_inorder_kernel(spec)
    if spec.kind == "masked":
        return _cuda_masked_kernel(spec)
    return _cuda_reorder_kernel(spec)


def swizzled_word(i, slots: int):
    """Shared-memory word of channel i (an int, numpy array or PrimExpr) in the reordering CUDA
    kernels' staged rows, words of ``slots`` float16: a lane stores the 8 words of its chunk as
    ``slots`` 16-byte pieces, and the 8 lanes of a quarter-warp (consecutive chunks, 8 * 2 *
    slots bytes apart) would put piece p into only 8 / slots different 16-byte bank groups. XOR
    the piece bits of i with the chunk number i >> 3 shifted down by them, and the quarter-warp's
    pieces p land in 8 different bank groups (conflict-free stores); a chunk's words stay within
    the chunk, and a gather pays one XOR."""
    piece_bits = int(math.log2(VEC // slots))  # log2(words per 16-byte piece)
    return i ^ (((i >> (3 + piece_bits)) & (slots - 1)) << piece_bits)


def word_slots(kind: str, k: int) -> int:
    """float16 slots per shared-memory word of a reordering CUDA kernel ("reorder" or "rmsnorm")
    for K-channel rows (see `_cuda_reorder_kernel`)."""
    slots = _SLOTS[kind]
    while slots > 2 and 2 * slots * k > _STAGE_BYTES:
        slots //= 2
    if 2 * slots * k > _MAX_STAGE_BYTES:
        raise UserError(f"channel count {k} needs {2 * slots * k} bytes of shared memory per "
                        f"block, more than the {_MAX_STAGE_BYTES} a block may have on sm_80-sm_89")
    return slots


def _cuda_reorder_kernel(spec: _Spec) -> tirx.PrimFunc:
    """RMSNorm + reorder + quantize, or reorder + quantize: one block per tile of R rows.

    The reorder is a random gather; from global memory it would touch a different 128-byte line
    per lane, so the rows are staged in shared memory and gathered from there, where a warp's 32
    random reads still hit the same bank ~3.5 times on average (one wavefront each). To spend
    those wavefronts on several rows at once, the block stages R rows *interleaved*: the word of
    channel i holds ``slots`` float16 values, x[i] of the R rows (and w[i] for RMSNorm), so one
    4-byte (8-byte) gather fetches channel i of every row: ~3.5 (~6.2) wavefronts per warp-wide
    gather for 2 rows (3 rows and w) instead of 3.5 per row (and 3.5 more for w). The reorder
    index is read once per tile, not per row. Staging stores are 16-byte pieces: RMSNorm's lanes
    stage 8-channel chunks (its sum of squares runs in that order), in the conflict-free order
    of `swizzled_word`; reorder's lanes stage 4-channel pieces, conflict-free in channel order,
    so its gathers need no swizzle arithmetic. Reorder's two rows share each gathered word
    through the group absmax too (`_paired_group_absmax`).

    On the H200 the gathers were not what bounds these kernels (Nsight Compute, 4 rows per
    block: 58% issue slots, 58% ALU pipe, 66% L1, 45% DRAM, 6 warps per scheduler): they are
    latency-bound, so ``_SLOTS`` trades rows per block against blocks per SM, and the per-chunk
    code is straight-line with each step done for all R rows before the next, so the rows'
    dependency chains (shuffles, reciprocal, codes) overlap. Cutting a fifth of the reorder
    kernel's instructions gained little for that reason; shorter chains gained more (reorder's
    256 threads, `_REORDER_THREADS`).
    """
    K, N, O, G = spec.k, spec.normal, spec.n_outliers, spec.group_size
    rms = spec.kind == "rmsnorm"
    c4, c8, eps = spec.c4, spec.c8, spec.eps
    threads = LANES if rms else _REORDER_THREADS
    warps = threads // _WARP
    slots = word_slots(spec.kind, K)
    R = slots - 1 if rms else slots  # rows per block; RMSNorm's last slot carries w
    wu = slots // 2  # uint32 per word
    chunks = K // VEC  # 8-channel chunks of a row
    in_steps = -(-chunks // threads)
    q_chunks = N // VEC  # chunks of INT4 channels
    q_steps = -(-q_chunks // threads)
    o_steps = -(-O // threads)  # outlier channels a lane handles, one at a time
    group_lanes = G // VEC  # consecutive lanes that share one INT4 scale

    def value(gw, e, r, rs):
        """float32 input of row r at gathered channel e ((x * rs) * w for RMSNorm)."""
        x = _half(gw[e * wu + r // 2], r % 2)
        if rs is None:
            return x
        return (x * rs[r]) * _half(gw[e * wu + R // 2], R % 2)

    def staged_word(i):
        """Shared-memory word of channel i: swizzled for RMSNorm's 8-channel staging stores,
        in channel order for reorder's 4-channel ones (see `stage_reorder`)."""
        return swizzled_word(i, slots) if rms else i

    @T.macro
    def stage_rms(X, W, xs, row0, M, tx, sumsq):
        # All 16-byte loads of the block's rows first (rows past M re-read row M - 1; nothing
        # of theirs is stored), then the interleaved words to shared memory, and the sums of
        # squares of each row in the lane order of the module docstring (8-channel chunks).
        xv = T.alloc_local((in_steps * slots * VEC,), "float16")
        for step in T.unroll(in_steps):
            if tx + step * threads < chunks:
                for r in T.unroll(R):
                    for e in T.vectorized(VEC):
                        xv[(step * slots + r) * VEC + e] = X[
                            T.min(row0 + r, M - 1), (tx + step * threads) * VEC + e]
                for e in T.vectorized(VEC):
                    xv[(step * slots + R) * VEC + e] = W[(tx + step * threads) * VEC + e]
        for step in T.unroll(in_steps):
            if tx + step * threads < chunks:
                words = T.alloc_local((VEC * wu,), "uint32")
                for e in T.unroll(VEC):
                    for u in T.unroll(wu):
                        words[e * wu + u] = _pair(xv[(step * slots + 2 * u) * VEC + e],
                                                  xv[(step * slots + 2 * u + 1) * VEC + e])
                for p in T.unroll(slots):
                    first = swizzled_word((tx + step * threads) * VEC + p * (VEC // slots), slots)
                    for u in T.vectorized(4):
                        xs[first * wu + u] = words[p * 4 + u]
                for r in T.unroll(R):
                    for e in T.unroll(VEC):
                        x = T.Cast("float32", xv[(step * slots + r) * VEC + e])
                        sumsq[r] = sumsq[r] + x * x

    # reorder: a lane loads 4 channels (8 bytes) of each of the 2 rows and stores their 4 words
    # as one 16-byte piece, lanes in channel order: conflict-free without a swizzle, so the
    # gathers read word ``index[j]`` as it is.
    piece = 16 // (2 * slots)  # channels per 16-byte piece of staged words
    pieces = K // piece
    piece_steps = -(-pieces // threads)

    @T.macro
    def stage_reorder(X, xs, row0, M, tx):
        xv = T.alloc_local((piece_steps * R * piece,), "float16")
        for step in T.unroll(piece_steps):
            if tx + step * threads < pieces:
                for r in T.unroll(R):
                    for e in T.vectorized(piece):
                        xv[(step * R + r) * piece + e] = X[
                            T.min(row0 + r, M - 1), (tx + step * threads) * piece + e]
        for step in T.unroll(piece_steps):
            if tx + step * threads < pieces:
                words = T.alloc_local((piece,), "uint32")
                for e in T.unroll(piece):
                    words[e] = _pair(xv[step * R * piece + e], xv[(step * R + 1) * piece + e])
                for e in T.vectorized(piece):
                    xs[(tx + step * threads) * piece + e] = words[e]

    @T.macro
    def quantize_rows(xs, Idx, rs, row0, M, tx, Q4w, S4, Q8, S8, part_max):
        gw = T.alloc_local((VEC * wu,), "uint32")
        ids = T.alloc_local((VEC,), "int32")
        if O > 0:
            ov = T.alloc_local((o_steps * R,), "float32")
            for step in T.unroll(o_steps):
                for u in T.unroll(wu):
                    gw[u] = T.uint32(0)
                if tx + step * threads < O:
                    ids[0] = Idx[N + tx + step * threads]
                    for u in T.vectorized(wu):
                        gw[u] = xs[staged_word(ids[0]) * wu + u]
                for r in T.unroll(R):
                    ov[step * R + r] = value(gw, 0, r, rs)
            _quantize_outliers(ov, R, row0, M, tx, threads, o_steps, Q8, S8, part_max, O, c8)
        elif tx < R and row0 + tx < M:
            S8[row0 + tx, 0] = T.float16(0)
        vals = T.alloc_local((R * VEC,), "float32")
        amax = T.alloc_local((R,), "float32")
        for step in T.unroll(q_steps):
            for i in T.unroll(VEC * wu):
                gw[i] = T.uint32(0)  # lanes past the INT4 part quantize zeros
            if tx + step * threads < q_chunks:
                for e in T.vectorized(VEC):
                    ids[e] = Idx[(tx + step * threads) * VEC + e]
                for e in T.unroll(VEC):
                    for u in T.vectorized(wu):
                        gw[e * wu + u] = xs[staged_word(ids[e]) * wu + u]
            for r in T.unroll(R):
                for e in T.unroll(VEC):
                    vals[r * VEC + e] = value(gw, e, r, rs)
            if rms:
                _float_group_absmax(vals, amax, R, group_lanes)
            else:
                _paired_group_absmax(gw, amax, group_lanes)
            _quantize_chunks(vals, amax, R, tx + step * threads, tx + step * threads < q_chunks,
                             row0, M, Q4w, S4, group_lanes, c4, True)

    def tiles(M):
        return (M + R - 1) // R

    if rms:

        @T.macro
        def tile(X, W, Idx, Q4w, S4, Q8, S8, xs, part_sum, part_max, row0, M, tx):
            sumsq = T.alloc_local((R,), "float32")
            for r in T.unroll(R):
                sumsq[r] = T.float32(0)
            stage_rms(X, W, xs, row0, M, tx, sumsq)
            _block_reduce(sumsq, R, part_sum, tx, warps, _add)  # its barrier also publishes xs
            rs = T.alloc_local((R,), "float32")
            for r in T.unroll(R):
                rs[r] = _cuda_rms_reciprocal(sumsq[r], K, eps)
            quantize_rows(xs, Idx, rs, row0, M, tx, Q4w, S4, Q8, S8, part_max)

        @T.prim_func
        def cuda(x_h: T.handle, w_h: T.handle, idx_h: T.handle, q4_h: T.handle, s4_h: T.handle,
                 q8_h: T.handle, s8_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            M = T.int64()
            X = T.match_buffer(x_h, (M, K), "float16")
            W = T.match_buffer(w_h, (K,), "float16")
            Idx = T.match_buffer(idx_h, (K,), "int32")
            Q4, S4, Q8, S8 = _match_outputs(q4_h, s4_h, q8_h, s8_h, M, spec)
            Q4w = T.decl_buffer((M, N // 8), "uint32", data=Q4.data)
            block = T.launch_thread("blockIdx.x", tiles(M))
            tx = T.launch_thread("threadIdx.x", threads)
            xs = T.alloc_buffer((K * wu,), "uint32", scope="shared.dyn")
            part_sum = T.alloc_shared((R * warps,), "float32")
            part_max = T.alloc_shared((R * warps,), "float32")
            tile(X, W, Idx, Q4w, S4, Q8, S8, xs, part_sum, part_max, block * R, M, tx)

    else:

        @T.macro
        def tile(X, Idx, Q4w, S4, Q8, S8, xs, part_max, row0, M, tx):
            stage_reorder(X, xs, row0, M, tx)
            T.tvm_storage_sync("shared")
            quantize_rows(xs, Idx, None, row0, M, tx, Q4w, S4, Q8, S8, part_max)

        @T.prim_func
        def cuda(x_h: T.handle, idx_h: T.handle, q4_h: T.handle, s4_h: T.handle, q8_h: T.handle,
                 s8_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            M = T.int64()
            X = T.match_buffer(x_h, (M, K), "float16")
            Idx = T.match_buffer(idx_h, (K,), "int32")
            Q4, S4, Q8, S8 = _match_outputs(q4_h, s4_h, q8_h, s8_h, M, spec)
            Q4w = T.decl_buffer((M, N // 8), "uint32", data=Q4.data)
            block = T.launch_thread("blockIdx.x", tiles(M))
            tx = T.launch_thread("threadIdx.x", threads)
            xs = T.alloc_buffer((K * wu,), "uint32", scope="shared.dyn")
            part_max = T.alloc_shared((R * warps,), "float32")
            tile(X, Idx, Q4w, S4, Q8, S8, xs, part_max, block * R, M, tx)

    return cuda


def _streamed_row_quantizer(spec: _Spec, threads: int):
    """The quantizing half of the one-block-per-row kernels, whose lanes hold their INT4 chunks'
    inputs in registers: a macro ``quantize(outlier, chunk, sources, row, M, tx, Q4w, S4, Q8, S8,
    part_max)`` quantizing the INT8 block from ``outlier(sources, row, j)``, the value of outlier
    channel j (one per lane and step; the block reduction of its absmax is the kernel's barrier),
    then the lane's INT4 chunks from ``chunk(sources, step, e)``, the value of channel e of the
    lane's chunk of that step (their group absmax by shuffles). ``sources`` are the kernel's
    buffers that the two read."""
    N, O, G = spec.normal, spec.n_outliers, spec.group_size
    c4, c8 = spec.c4, spec.c8
    q_chunks = N // VEC
    q_steps = -(-q_chunks // threads)
    o_steps = -(-O // threads)
    group_lanes = G // VEC

    @T.macro
    def quantize(outlier, chunk, sources, row, M, tx, Q4w, S4, Q8, S8, part_max):
        if O > 0:
            ov = T.alloc_local((o_steps,), "float32")
            for step in T.unroll(o_steps):
                ov[step] = T.float32(0)
                if tx + step * threads < O:
                    ov[step] = outlier(sources, row, tx + step * threads)
            _quantize_outliers(ov, 1, row, M, tx, threads, o_steps, Q8, S8, part_max, O, c8)
        elif tx == 0:
            S8[row, 0] = T.float16(0)
        vals = T.alloc_local((VEC,), "float32")
        for step in T.unroll(q_steps):
            for e in T.unroll(VEC):
                vals[e] = T.float32(0)
            if tx + step * threads < q_chunks:
                for e in T.unroll(VEC):
                    vals[e] = chunk(sources, step, e)
            amax = T.alloc_local((1,), "float32")
            _float_group_absmax(vals, amax, 1, group_lanes)
            _quantize_chunks(vals, amax, 1, tx + step * threads, tx + step * threads < q_chunks,
                             row, M, Q4w, S4, group_lanes, c4, False)

    return quantize


def _cuda_rmsnorm_inorder_kernel(spec: _Spec) -> tirx.PrimFunc:
    """RMSNorm + quantize of rows already in the quantizer's order: one block of LANES threads per
    row, each lane loading its 8-channel chunks of x and w straight into registers (16-byte loads,
    no staging, no gather), summing their squares in the order of the module docstring, then
    quantizing from the registers. Without the reorder's shared-memory round trip and barrier the
    per-row chain is short enough that the kernel streams: 1.3-1.4x the reordering kernel for
    prefill rows and 1.9x for decode rows on an H100 (docs/bench/quantize_kernels.md)."""
    K, N, eps = spec.k, spec.normal, spec.eps
    threads = LANES
    warps = threads // _WARP
    chunks = K // VEC
    steps = -(-chunks // threads)
    quantize = _streamed_row_quantizer(spec, threads)

    def outlier(sources, row, j):
        # The outlier channels again from global memory (L1 hits): a lane's outlier channels
        # are not the chunks it holds.
        X, W, _, _, rs = sources
        return (T.Cast("float32", X[row, N + j]) * rs[0]) * T.Cast("float32", W[N + j])

    def chunk(sources, step, e):
        _, _, xv, wv, rs = sources
        return (T.Cast("float32", xv[step * VEC + e]) * rs[0]) * T.Cast("float32", wv[step * VEC + e])

    @T.prim_func
    def cuda(x_h: T.handle, w_h: T.handle, q4_h: T.handle, s4_h: T.handle, q8_h: T.handle, s8_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        M = T.int64()
        X = T.match_buffer(x_h, (M, K), "float16")
        W = T.match_buffer(w_h, (K,), "float16")
        Q4, S4, Q8, S8 = _match_outputs(q4_h, s4_h, q8_h, s8_h, M, spec)
        Q4w = T.decl_buffer((M, N // 8), "uint32", data=Q4.data)
        row = T.launch_thread("blockIdx.x", M)
        tx = T.launch_thread("threadIdx.x", threads)
        part_sum = T.alloc_shared((warps,), "float32")
        part_max = T.alloc_shared((warps,), "float32")
        xv = T.alloc_local((steps * VEC,), "float16")
        wv = T.alloc_local((steps * VEC,), "float16")
        for step in T.unroll(steps):
            if tx + step * threads < chunks:
                for e in T.vectorized(VEC):
                    xv[step * VEC + e] = X[row, (tx + step * threads) * VEC + e]
                for e in T.vectorized(VEC):
                    wv[step * VEC + e] = W[(tx + step * threads) * VEC + e]
        sumsq = T.alloc_local((1,), "float32")
        sumsq[0] = T.float32(0)
        for step in T.unroll(steps):
            if tx + step * threads < chunks:
                for e in T.unroll(VEC):
                    sumsq[0] = sumsq[0] + T.Cast("float32", xv[step * VEC + e]) * T.Cast("float32", xv[step * VEC + e])
        _block_reduce(sumsq, 1, part_sum, tx, warps, _add)
        rs = T.alloc_local((1,), "float32")
        rs[0] = _cuda_rms_reciprocal(sumsq[0], K, eps)
        quantize(outlier, chunk, (X, W, xv, wv, rs), row, M, tx, Q4w, S4, Q8, S8, part_max)

    return cuda


def _cuda_silu_kernel(spec: _Spec) -> tirx.PrimFunc:
    """SiLU-mul + quantize: one block of 256 threads per row, no shared-memory staging (no
    reorder), every 16-byte load of the INT4 part issued before the outliers' reduction."""
    K, N = spec.k, spec.normal
    threads = _ROW_THREADS
    q_chunks = N // VEC
    q_steps = -(-q_chunks // threads)
    quantize = _streamed_row_quantizer(spec, threads)

    def outlier(sources, row, j):
        GU, _, _ = sources
        return _silu_fast_div(T.Cast("float32", GU[row, N + j])) * T.Cast("float32", GU[row, K + N + j])

    def chunk(sources, step, e):
        _, gv, uv = sources
        return _silu_fast_div(T.Cast("float32", gv[step * VEC + e])) * T.Cast("float32", uv[step * VEC + e])

    @T.prim_func
    def cuda(gu_h: T.handle, q4_h: T.handle, s4_h: T.handle, q8_h: T.handle, s8_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        M = T.int64()
        GU = T.match_buffer(gu_h, (M, 2 * K), "float16")
        Q4, S4, Q8, S8 = _match_outputs(q4_h, s4_h, q8_h, s8_h, M, spec)
        Q4w = T.decl_buffer((M, N // 8), "uint32", data=Q4.data)
        row = T.launch_thread("blockIdx.x", M)
        tx = T.launch_thread("threadIdx.x", threads)
        part_max = T.alloc_shared((threads // _WARP,), "float32")
        gv = T.alloc_local((q_steps * VEC,), "float16")
        uv = T.alloc_local((q_steps * VEC,), "float16")
        for step in T.unroll(q_steps):
            if tx + step * threads < q_chunks:
                for e in T.vectorized(VEC):
                    gv[step * VEC + e] = GU[row, (tx + step * threads) * VEC + e]
                for e in T.vectorized(VEC):
                    uv[step * VEC + e] = GU[row, K + (tx + step * threads) * VEC + e]
        quantize(outlier, chunk, (GU, gv, uv), row, M, tx, Q4w, S4, Q8, S8, part_max)

    return cuda


def _cuda_masked_kernel(spec: _Spec) -> tirx.PrimFunc:
    """Masked outliers + quantize: one block of 256 threads per row, as SiLU-mul. A lane loads its
    8-channel chunks of x (16-byte loads) and their ``outlier_mask`` bytes straight into
    registers and zeroes the outlier channels by a select, so the INT4 part needs neither staging
    nor a gather (`reorder_quantize` needs both). The INT8 block is gathered one float16 at a time
    from the row the block is reading anyway; all of those loads are issued before the outliers'
    block reduction, the one barrier."""
    N, O = spec.normal, spec.n_outliers
    threads = _ROW_THREADS
    q_chunks = N // VEC
    q_steps = -(-q_chunks // threads)
    quantize = _streamed_row_quantizer(spec, threads)

    def outlier(sources, row, j):
        X, Outliers, _, _ = sources
        return T.Cast("float32", X[row, Outliers[j]])

    def chunk(sources, step, e):
        _, _, xv, mask = sources
        return _unless_outlier(mask[step], e, T.Cast("float32", xv[step * VEC + e]))

    @T.prim_func
    def cuda(x_h: T.handle, outliers_h: T.handle, mask_h: T.handle, q4_h: T.handle, s4_h: T.handle,
             q8_h: T.handle, s8_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        M = T.int64()
        X = T.match_buffer(x_h, (M, N), "float16")
        Outliers = T.match_buffer(outliers_h, (O,), "int32")
        Mask = T.match_buffer(mask_h, (q_chunks,), "uint8")
        Q4, S4, Q8, S8 = _match_outputs(q4_h, s4_h, q8_h, s8_h, M, spec)
        Q4w = T.decl_buffer((M, N // 8), "uint32", data=Q4.data)
        row = T.launch_thread("blockIdx.x", M)
        tx = T.launch_thread("threadIdx.x", threads)
        part_max = T.alloc_shared((threads // _WARP,), "float32")
        xv = T.alloc_local((q_steps * VEC,), "float16")
        mask = T.alloc_local((q_steps,), "uint8")
        for step in T.unroll(q_steps):
            if tx + step * threads < q_chunks:
                for e in T.vectorized(VEC):
                    xv[step * VEC + e] = X[row, (tx + step * threads) * VEC + e]
                mask[step] = Mask[tx + step * threads]
        quantize(outlier, chunk, (X, Outliers, xv, mask), row, M, tx, Q4w, S4, Q8, S8, part_max)

    return cuda
