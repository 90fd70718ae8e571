"""Fused activation quantizers: the kernels that turn fp16 activations into Atom's W4A4 input.

Three kernels, each one pass over a row of tokens, each writing the Atom activation layout of
`atom_tvm.quantization.formats` (packed INT4 groups + one INT8 outlier block per token):

* `rmsnorm_reorder_quantize` - RMSNorm of the residual stream, then the channel reorder, then
  quantization: the input of q/k/v and gate/up projections.
* `silu_mul_quantize` - SiLU(gate) * up of the fused gate_up GEMM output: the down_proj input.
  No reorder: down_proj's input permutation is folded into the gate/up weight rows offline, so
  the last O channels of ``gate_up[:, :I]`` and ``gate_up[:, I:]`` already are the outliers.
* `reorder_quantize` - reorder and quantize: the o_proj input.

Every kernel takes the token count M as a dynamic dimension and writes, destination-passing
style, ``q4 uint8 [M, (K-O)/2], s4 float16 [M, (K-O)/G], q8 int8 [M, O], s8 float16 [M, 1]``.

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
  `reorder_quantize` has no transcendental and matches exactly.
* Scales: ``r = 1 / float32(scale)`` correctly rounded (``__frcp_rn`` on CUDA, see above).
* Codes: ``clamp(rint(y * r))`` as formats defines them, computed as ``bits(clamp(y * r) +
  1.5 * 2**23)`` (see `_code`): exact, and cheaper on a GPU than a round and a conversion.
* ``--use_fast_math`` also flushes float32 subnormals to zero; no value these kernels compute
  from float16 data is subnormal except a SiLU output below 1e-38, whose code is 0 either way.

Variants
--------
``cpu``: an LLVM build with the same numerics, one parallel task per token row; CI proves the
kernels' indexing, packing and rounding with it. ``cuda``: hand-written TIR with explicit
threads, one thread block per token row: 128 threads for the two reordering kernels, 256 for
SiLU-mul. Each thread owns 8 consecutive channels per step (one 16-byte fp16 load, one 4-byte
store of packed INT4), so an INT4 group of 64 / 128 channels is 8 / 16 consecutive lanes of one
warp and its absmax is a 3 / 4-step XOR shuffle; the outlier block's absmax and the RMSNorm sum
of squares are block reductions (warp shuffles, then the warp results through shared memory).
The reordering kernels stage the input row in shared memory with contiguous 16-byte loads and
gather from there; RMSNorm stages each channel's x and w as one 32-bit word, so one gather
fetches both (rows wider than 12288 channels, whose words would not fit in 48 KiB, gather w from
global memory instead).
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import tirx
from tvm.script import tirx as T

from atom_tvm.errors import UserError
from atom_tvm.quantization.formats import AtomActivation, check_atom_split, quantize_atom_activation
from deploy.targets import make_target

__all__ = [
    "VARIANTS",
    "LANES",
    "rmsnorm_reorder_quantize",
    "silu_mul_quantize",
    "reorder_quantize",
    "rmsnorm_ref",
    "rmsnorm_reorder_quantize_ref",
    "silu_mul_ref",
    "silu_mul_quantize_ref",
    "reorder_quantize_ref",
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
#: Threads per row of the SiLU-mul kernel.
_SILU_THREADS = 256
#: Static shared memory a CUDA block may use on every supported arch.
_MAX_STATIC_SHARED = 48 * 1024


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


class _Spec:
    """The compile-time constants of one kernel, checked once."""

    def __init__(self, kind: str, k: int, group_size: int, n_outliers: int, clip: float, eps: float):
        check_atom_split(k, group_size, n_outliers)
        if k % VEC:
            raise UserError(f"channel count {k} is not a multiple of {VEC} (one 16-byte fp16 vector)")
        if not 0.0 < clip <= 1.0:
            raise UserError(f"clip ratio {clip} is outside (0, 1]")
        if kind == "rmsnorm" and not eps > 0.0:
            raise UserError(f"RMSNorm eps must be positive, got {eps}")
        self.kind = kind
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


def build(func: tirx.PrimFunc, variant: str, archs: tuple[str, ...] = ("sm_90a",)):
    """Compile one kernel (or an IRModule of several) for its variant's target.

    CUDA builds go through nvcc into a fatbin for ``archs`` and work on a host without a GPU
    (see `atom_tvm.cuda_build`). Returns TVM's executable; call ``exe[func_name](*tensors)``.
    """
    from atom_tvm.cuda_build import enable_cuda_codegen, use_nvcc_fatbin

    if variant == "cpu":
        return tvm.compile(func, make_target("llvm", []))
    if variant != "cuda":
        raise UserError(f"unknown kernel variant {variant!r}: choose from {', '.join(VARIANTS)}")
    enable_cuda_codegen()
    with use_nvcc_fatbin(list(archs)):
        return tvm.compile(func, make_target("cuda", list(archs)))


# ---------------------------------------------------------------------------------------------
# Shared scalar steps (TVMScript macros, inlined where they are used)
# ---------------------------------------------------------------------------------------------


@T.macro
def _scale_and_reciprocal(scale, recip, absmax, const, reciprocal):
    # float16(absmax * float32(clip / qmax)); codes use the float16 value's exact reciprocal.
    scale = T.Cast("float16", absmax * T.float32(const))
    recip = T.Select(scale == T.float16(0), T.float32(0), reciprocal(T.Cast("float32", scale)))


def _cpu_reciprocal(x):
    return T.float32(1) / x


def _cuda_reciprocal(x):
    """Correctly rounded 1 / x even under nvcc's --use_fast_math, which TVM passes by default
    and which turns a plain ``1.0f / x`` into the approximate MUFU.RCP (wrong by one ulp for
    some scales, which moves codes that sit on a rounding tie)."""
    return T.call_pure_extern("float32", "__frcp_rn", x)


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


def _nibbles(codes, n: int):
    """Pack n INT4 codes (`_code` words) into an int32, code 2j in the low nibble of byte j."""
    word = T.bitwise_and(codes[0], 15)
    for e in range(1, n):
        word = T.bitwise_or(word, T.shift_left(T.bitwise_and(codes[e], 15), 4 * e))
    return word


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

    if kind == "rmsnorm":

        @T.prim_func
        def cpu(x_h: T.handle, w_h: T.handle, idx_h: T.handle, q4_h: T.handle, s4_h: T.handle,
                q8_h: T.handle, s8_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            M = T.int64()
            X = T.match_buffer(x_h, (M, K), "float16")
            W = T.match_buffer(w_h, (K,), "float16")
            Idx = T.match_buffer(idx_h, (K,), "int32")
            Q4 = T.match_buffer(q4_h, (M, N // 2), "uint8")
            S4 = T.match_buffer(s4_h, (M, N // G), "float16")
            Q8 = T.match_buffer(q8_h, (M, O), "int8")
            S8 = T.match_buffer(s8_h, (M, 1), "float16")
            for m in T.parallel(M):
                lanes = T.decl_buffer((LANES,), "float32")
                tmp = T.decl_buffer((LANES,), "float32")
                y = T.decl_buffer((K,), "float32")
                # Replays the CUDA reduction order: lane sums, warp butterflies, block butterfly.
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
                rs = T.float32(1) / T.sqrt(lanes[0] / T.float32(K) + T.float32(eps))
                for j in range(K):
                    src = Idx[j]
                    y[j] = (T.Cast("float32", X[m, src]) * rs) * T.Cast("float32", W[src])
                quantize_row(y, m, Q4, S4, Q8, S8)

    elif kind == "silu":

        @T.prim_func
        def cpu(gu_h: T.handle, q4_h: T.handle, s4_h: T.handle, q8_h: T.handle, s8_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            M = T.int64()
            GU = T.match_buffer(gu_h, (M, 2 * K), "float16")
            Q4 = T.match_buffer(q4_h, (M, N // 2), "uint8")
            S4 = T.match_buffer(s4_h, (M, N // G), "float16")
            Q8 = T.match_buffer(q8_h, (M, O), "int8")
            S8 = T.match_buffer(s8_h, (M, 1), "float16")
            for m in T.parallel(M):
                y = T.decl_buffer((K,), "float32")
                for j in range(K):
                    y[j] = _silu(T.Cast("float32", GU[m, j])) * T.Cast("float32", GU[m, K + j])
                quantize_row(y, m, Q4, S4, Q8, S8)

    else:

        @T.prim_func
        def cpu(x_h: T.handle, idx_h: T.handle, q4_h: T.handle, s4_h: T.handle, q8_h: T.handle,
                s8_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            M = T.int64()
            X = T.match_buffer(x_h, (M, K), "float16")
            Idx = T.match_buffer(idx_h, (K,), "int32")
            Q4 = T.match_buffer(q4_h, (M, N // 2), "uint8")
            S4 = T.match_buffer(s4_h, (M, N // G), "float16")
            Q8 = T.match_buffer(q8_h, (M, O), "int8")
            S8 = T.match_buffer(s8_h, (M, 1), "float16")
            for m in T.parallel(M):
                y = T.decl_buffer((K,), "float32")
                for j in range(K):
                    y[j] = T.Cast("float32", X[m, Idx[j]])
                quantize_row(y, m, Q4, S4, Q8, S8)

    return cpu


# ---------------------------------------------------------------------------------------------
# cuda: one thread block per row, values in registers, shuffles for the reductions
# ---------------------------------------------------------------------------------------------


def _shuffle_xor(value, lane_mask):
    return T.tvm_warp_shuffle_xor(T.uint32(_FULL_MASK), value, lane_mask, _WARP, _WARP)


@T.macro
def _warp_sum(v, width):
    # XOR butterfly over aligned groups of `width` lanes: every lane ends with the same sum.
    for s in T.unroll(int(math.log2(width))):
        v = v + _shuffle_xor(v, T.shift_right(width, s + 1))


@T.macro
def _warp_max(v, width):
    for s in T.unroll(int(math.log2(width))):
        v = T.max(v, _shuffle_xor(v, T.shift_right(width, s + 1)))


def _packed_codes(vals, recip):
    """The 8 INT4 codes of a lane's chunk packed into one uint32 (little endian: byte j = codes
    2j, 2j+1), i.e. exactly 4 bytes of the q4 row."""
    return T.Cast("uint32", _nibbles([_code(vals[e], recip, *_INT4) for e in range(VEC)], VEC))


def _low_half(word):
    """float32 of the float16 in the low 16 bits of a uint32."""
    return T.Cast("float32", T.reinterpret("float16", T.Cast("uint16", T.bitwise_and(word, 0xFFFF))))


def _high_half(word):
    return T.Cast("float32", T.reinterpret("float16", T.Cast("uint16", T.shift_right(word, 16))))


def _cuda_kernel(spec: _Spec) -> tirx.PrimFunc:
    K, N, O, G = spec.k, spec.normal, spec.n_outliers, spec.group_size
    kind = spec.kind
    c4, c8, eps = spec.c4, spec.c8, spec.eps
    # 128 threads (4 chunks of a 4096-wide row each) for the reordering kernels: their per-row
    # fixed work (block reductions, scales) is spread over twice the channels per thread; on the
    # H200 that measured 3-8% faster than 256 (docs/bench/quantize_kernels.md). SiLU-mul keeps
    # 256 threads, with which it already streams at the copy bandwidth.
    threads = _SILU_THREADS if kind == "silu" else LANES
    warps = threads // _WARP
    chunks = K // VEC  # 16-byte input chunks of a row (staged kernels)
    in_steps = -(-chunks // threads)
    q_chunks = N // VEC  # chunks of INT4 channels
    q_steps = -(-q_chunks // threads)
    o_steps = -(-O // threads)  # outlier channels a thread handles, one at a time
    group_lanes = G // VEC  # consecutive threads that share one INT4 scale
    # RMSNorm stages x and w of channel i as one 32-bit word (x low, w high), so that a single
    # shared-memory gather fetches both; that needs 4 bytes per channel of the 48 KiB a block
    # may have. Wider rows keep x alone in shared memory and gather w from global memory.
    interleave = 4 * K <= _MAX_STATIC_SHARED
    # Idle threads still take part in every shuffle (full-mask shuffles need all 32 lanes), so
    # they run the arithmetic on zeros and only their loads and stores are guarded.

    @T.macro
    def block_sum(v, part, tx):
        _warp_sum(v, _WARP)
        if tx % _WARP == 0:
            part[tx // _WARP] = v
        T.tvm_storage_sync("shared")
        v = part[tx % warps]
        _warp_sum(v, warps)

    @T.macro
    def block_max(v, part, tx):
        _warp_max(v, _WARP)
        if tx % _WARP == 0:
            part[tx // _WARP] = v
        T.tvm_storage_sync("shared")
        v = part[tx % warps]
        _warp_max(v, warps)

    @T.macro
    def quantize_chunk(vals, tx, step, row, Q4w, S4):
        amax: T.float32 = T.float32(0)
        for e in T.unroll(VEC):
            amax = T.max(amax, T.abs(vals[e]))
        _warp_max(amax, group_lanes)
        scale: T.float16 = T.float16(0)
        recip: T.float32 = T.float32(0)
        _scale_and_reciprocal(scale, recip, amax, c4, _cuda_reciprocal)
        if tx + step * threads < q_chunks:
            Q4w[row, tx + step * threads] = _packed_codes(vals, recip)
            if tx % group_lanes == 0:
                S4[row, (tx + step * threads) // group_lanes] = scale

    @T.macro
    def quantize_outliers(ov, tx, row, Q8, S8, part):
        amax8: T.float32 = T.float32(0)
        for step in T.unroll(o_steps):
            amax8 = T.max(amax8, T.abs(ov[step]))
        block_max(amax8, part, tx)
        scale8: T.float16 = T.float16(0)
        recip8: T.float32 = T.float32(0)
        _scale_and_reciprocal(scale8, recip8, amax8, c8, _cuda_reciprocal)
        for step in T.unroll(o_steps):
            if tx + step * threads < O:
                Q8[row, tx + step * threads] = T.Cast("int8", _code(ov[step], recip8, *_INT8))
        if tx == 0:
            S8[row, 0] = scale8

    @T.macro
    def stage_row(X, W, xs, row, tx, sumsq):
        # Contiguous 16-byte loads of the whole row into shared memory for the reorder gathers,
        # all issued before any is used. RMSNorm (W given) sums the squares on the way, in the
        # lane order of the module docstring, and stores x (and w, if interleaved) per channel.
        xv = T.alloc_local((in_steps * VEC,), "float16")
        for step in T.unroll(in_steps):
            if tx + step * threads < chunks:
                for e in T.vectorized(VEC):
                    xv[step * VEC + e] = X[row, (tx + step * threads) * VEC + e]
        if W is not None and interleave:
            wv = T.alloc_local((in_steps * VEC,), "float16")
            for step in T.unroll(in_steps):
                if tx + step * threads < chunks:
                    for e in T.vectorized(VEC):
                        wv[step * VEC + e] = W[(tx + step * threads) * VEC + e]
        for step in T.unroll(in_steps):
            if tx + step * threads < chunks:
                if W is not None and interleave:
                    xw = T.alloc_local((VEC,), "uint32")
                    for e in T.unroll(VEC):
                        xw[e] = T.bitwise_or(
                            T.Cast("uint32", T.reinterpret("uint16", xv[step * VEC + e])),
                            T.shift_left(T.Cast("uint32", T.reinterpret("uint16", wv[step * VEC + e])), 16))
                    for e in T.vectorized(VEC):
                        xs[(tx + step * threads) * VEC + e] = xw[e]
                else:
                    for e in T.vectorized(VEC):
                        xs[(tx + step * threads) * VEC + e] = xv[step * VEC + e]
                if W is not None:
                    for e in T.unroll(VEC):
                        sumsq = sumsq + T.Cast("float32", xv[step * VEC + e]) * T.Cast(
                            "float32", xv[step * VEC + e])

    def normed(xs, W, src, rs):
        """(x * rs) * w of input channel src (one 32-bit word gather when interleaved)."""
        if interleave:
            return (_low_half(xs[src]) * rs) * _high_half(xs[src])
        return (T.Cast("float32", xs[src]) * rs) * T.Cast("float32", W[src])

    if kind == "rmsnorm":

        @T.prim_func
        def cuda(x_h: T.handle, w_h: T.handle, idx_h: T.handle, q4_h: T.handle, s4_h: T.handle,
                 q8_h: T.handle, s8_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            M = T.int64()
            X = T.match_buffer(x_h, (M, K), "float16")
            W = T.match_buffer(w_h, (K,), "float16")
            Idx = T.match_buffer(idx_h, (K,), "int32")
            Q4 = T.match_buffer(q4_h, (M, N // 2), "uint8")
            S4 = T.match_buffer(s4_h, (M, N // G), "float16")
            Q8 = T.match_buffer(q8_h, (M, O), "int8")
            S8 = T.match_buffer(s8_h, (M, 1), "float16")
            Q4w = T.decl_buffer((M, N // 8), "uint32", data=Q4.data)
            row = T.launch_thread("blockIdx.x", M)
            tx = T.launch_thread("threadIdx.x", threads)
            xs = T.alloc_shared((K,), "uint32" if interleave else "float16")
            part_sum = T.alloc_shared((warps,), "float32")
            part_max = T.alloc_shared((warps,), "float32")
            sumsq: T.float32 = T.float32(0)
            stage_row(X, W, xs, row, tx, sumsq)
            block_sum(sumsq, part_sum, tx)  # its barrier also publishes xs
            rs: T.float32 = _cuda_rms_reciprocal(sumsq, K, eps)
            if O > 0:
                ov = T.alloc_local((o_steps,), "float32")
                for step in T.unroll(o_steps):
                    ov[step] = T.float32(0)
                    if tx + step * threads < O:
                        ov[step] = normed(xs, W, Idx[N + tx + step * threads], rs)
                quantize_outliers(ov, tx, row, Q8, S8, part_max)
            elif tx == 0:
                S8[row, 0] = T.float16(0)
            vals = T.alloc_local((VEC,), "float32")
            ids = T.alloc_local((VEC,), "int32")
            for step in T.unroll(q_steps):
                for e in T.unroll(VEC):
                    vals[e] = T.float32(0)
                if tx + step * threads < q_chunks:
                    for e in T.vectorized(VEC):
                        ids[e] = Idx[(tx + step * threads) * VEC + e]
                    for e in T.unroll(VEC):
                        vals[e] = normed(xs, W, ids[e], rs)
                quantize_chunk(vals, tx, step, row, Q4w, S4)

    elif kind == "reorder":

        @T.prim_func
        def cuda(x_h: T.handle, idx_h: T.handle, q4_h: T.handle, s4_h: T.handle, q8_h: T.handle,
                 s8_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            M = T.int64()
            X = T.match_buffer(x_h, (M, K), "float16")
            Idx = T.match_buffer(idx_h, (K,), "int32")
            Q4 = T.match_buffer(q4_h, (M, N // 2), "uint8")
            S4 = T.match_buffer(s4_h, (M, N // G), "float16")
            Q8 = T.match_buffer(q8_h, (M, O), "int8")
            S8 = T.match_buffer(s8_h, (M, 1), "float16")
            Q4w = T.decl_buffer((M, N // 8), "uint32", data=Q4.data)
            row = T.launch_thread("blockIdx.x", M)
            tx = T.launch_thread("threadIdx.x", threads)
            xs = T.alloc_shared((K,), "float16")
            part_max = T.alloc_shared((warps,), "float32")
            stage_row(X, None, xs, row, tx, None)
            T.tvm_storage_sync("shared")
            if O > 0:
                ov = T.alloc_local((o_steps,), "float32")
                for step in T.unroll(o_steps):
                    ov[step] = T.float32(0)
                    if tx + step * threads < O:
                        ov[step] = T.Cast("float32", xs[Idx[N + tx + step * threads]])
                quantize_outliers(ov, tx, row, Q8, S8, part_max)
            elif tx == 0:
                S8[row, 0] = T.float16(0)
            vals = T.alloc_local((VEC,), "float32")
            ids = T.alloc_local((VEC,), "int32")
            for step in T.unroll(q_steps):
                for e in T.unroll(VEC):
                    vals[e] = T.float32(0)
                if tx + step * threads < q_chunks:
                    for e in T.vectorized(VEC):
                        ids[e] = Idx[(tx + step * threads) * VEC + e]
                    for e in T.unroll(VEC):
                        vals[e] = T.Cast("float32", xs[ids[e]])
                quantize_chunk(vals, tx, step, row, Q4w, S4)

    else:

        @T.prim_func
        def cuda(gu_h: T.handle, q4_h: T.handle, s4_h: T.handle, q8_h: T.handle, s8_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            M = T.int64()
            GU = T.match_buffer(gu_h, (M, 2 * K), "float16")
            Q4 = T.match_buffer(q4_h, (M, N // 2), "uint8")
            S4 = T.match_buffer(s4_h, (M, N // G), "float16")
            Q8 = T.match_buffer(q8_h, (M, O), "int8")
            S8 = T.match_buffer(s8_h, (M, 1), "float16")
            Q4w = T.decl_buffer((M, N // 8), "uint32", data=Q4.data)
            row = T.launch_thread("blockIdx.x", M)
            tx = T.launch_thread("threadIdx.x", threads)
            part_max = T.alloc_shared((warps,), "float32")
            # Issue every 16-byte load of the INT4 part first, so that they are in flight while
            # the outliers go through their block reduction.
            gv = T.alloc_local((q_steps * VEC,), "float16")
            uv = T.alloc_local((q_steps * VEC,), "float16")
            for step in T.unroll(q_steps):
                if tx + step * threads < q_chunks:
                    for e in T.vectorized(VEC):
                        gv[step * VEC + e] = GU[row, (tx + step * threads) * VEC + e]
                    for e in T.vectorized(VEC):
                        uv[step * VEC + e] = GU[row, K + (tx + step * threads) * VEC + e]
            if O > 0:
                ov = T.alloc_local((o_steps,), "float32")
                for step in T.unroll(o_steps):
                    ov[step] = T.float32(0)
                    if tx + step * threads < O:
                        ov[step] = _silu_fast_div(T.Cast("float32", GU[row, N + tx + step * threads])) * T.Cast(
                            "float32", GU[row, K + N + tx + step * threads])
                quantize_outliers(ov, tx, row, Q8, S8, part_max)
            elif tx == 0:
                S8[row, 0] = T.float16(0)
            vals = T.alloc_local((VEC,), "float32")
            for step in T.unroll(q_steps):
                for e in T.unroll(VEC):
                    vals[e] = T.float32(0)
                if tx + step * threads < q_chunks:
                    for e in T.unroll(VEC):
                        vals[e] = _silu_fast_div(T.Cast("float32", gv[step * VEC + e])) * T.Cast(
                            "float32", uv[step * VEC + e])
                quantize_chunk(vals, tx, step, row, Q4w, S4)

    return cuda
