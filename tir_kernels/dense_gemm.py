"""Dense GEMMs for the baselines: fp16 x fp16 (fp16 and W4A16 schemes) and int8 x int8 (W8A8).

Operands (row-major; W in the ``nn.Linear`` layout, so both operands are K-contiguous)::

    fp16_gemm:  x float16 [M, K]                    w float16 [N, K]
    int8_gemm:  x int8 [M, K]  sx float16 [M, 1]    w int8 [N, K]  sw float16 [N, 1]
    residual float16 [M, N] (optional)  ->  y float16 [M, N]

Numerics (the references below are the definitions):

* ``fp16_gemm``: ``y = f16(sum_k f32(x[m,k]) * f32(w[n,k]) (+ f32(residual)))`` with the sum in
  float32. Products of two fp16 are exact in float32, but the kernels add them in different
  orders (the tensor cores in k-slices of 16, the CPU twin sequentially), so no order is
  fixed: `fp16_gemm_reference` is the exact sum (float64) rounded once to float16, and a
  kernel is correct when it is within `fp16_tolerance` of it, elementwise (one float16 ulp for
  the final rounding plus the worst case of any float32 summation order, ``K 2^-22 sum|x w|``,
  which also covers tensor cores that truncate instead of rounding) and in relative L2 norm.
* ``int8_gemm``: exact up to the final scaling, so every variant is bit-exact to::

      acc = sum_k x[m,k] * w[n,k]                    # exact int32 (|acc| <= K 2^14 < 2^31)
      s   = f32(sx[m]) * f32(sw[n])                  # float32, rounded
      p   = f32(acc) * s                             # float32, rounded (never fused with the add)
      y   = f16(p)          or, with a residual,     y = f16(p + f32(residual[m,n]))

  ``f32(int)`` and ``f16(float)`` round to nearest even.

Variants, chosen from the target by `fp16_gemm` / `int8_gemm`:

* ``cpu`` (llvm): parallel over panels of 16 columns, each panel's weights converted once and
  every row of x streamed over them with the 16 columns in one vector.
* ``sm80`` (CUDA sm_80 ... plain sm_90): the tiled tensor-core kernel of `tir_kernels.gemm_common`
  (cp.async ring of swizzled 32-byte-row tiles, ldmatrix, mma.sync) with dense operands: a
  32-byte step of K is 16 fp16 channels (``mma.sync m16n8k16 f16.f16.f32``) or 32 int8 channels
  (``m16n8k32 s8.s8.s32``), and ldmatrix of either fills the mma fragments as they are, exactly as
  for the packed INT4 bytes of the W4A4 kernel. There is no group epilogue: one accumulator per
  output for all of K, and the scaling (int8) or residual only at the end.
* ``sm90a`` (sm_90a, Hopper): ``wgmma.mma_async`` with both operands in shared memory (`_wgmma_body`).
  128-byte steps of K (64 fp16 or 128 int8 channels) are copied by cp.async into a ring, each
  tile in the 128-byte swizzle wgmma reads without bank conflicts (16-byte chunk c of row r at
  chunk ``c ^ (r % 8)``); two warpgroups of 64 rows x 256 columns each issue 4 k-slices per step
  (``m64n256k16 f16`` or twice ``m64n128k32 s8``) and wait only for the previous step's. The
  same tiles in wgmma's unswizzled core-matrix layout ran at a third of this speed. The tile
  is chosen at run time by M (`SM90A`'s tiers: 128x256, 128x128, or 64x128 blocks of one
  warpgroup), so that small M still spreads over the SMs.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tvm
from tvm.script import tirx as T

from atom_tvm.errors import UserError
from tir_kernels.gemm_common import (STEP_BYTES, TileConfig, _copy16_unless, _mma, _swizzle, by_rows,
                                     fragment_loader)
from tir_kernels.w4a4_gemm import _exact_int_dot


@dataclasses.dataclass(frozen=True)
class Operand:
    """What differs between the fp16 and int8 kernels: element type and the mma that takes one
    32-byte step of K, with its accumulator."""

    name: str
    dtype: str
    mma_shape: str
    ptx_dtype: str
    acc_dtype: str
    ptx_acc: str

    @property
    def bytes(self) -> int:
        return tvm.DataType(self.dtype).bits // 8


FP16 = Operand("fp16", "float16", "m16n8k16", "fp16", "float32", "fp32")
INT8 = Operand("int8", "int8", "m16n8k32", "int8", "int32", "int32")


@dataclasses.dataclass(frozen=True)
class DenseConfig(TileConfig):
    """A tiled-kernel configuration (``stages`` counts 32-byte steps) whose barriers come every
    ``block_steps`` steps; ``widen`` is unused (no INT4 here)."""

    block_steps: int = 2


#: Bytes of K per pipeline step: one row of a 128-byte swizzle atom (8 rows x 128 bytes, 16-byte
#: chunk c of row r stored at chunk c ^ (r % 8)), the layout wgmma reads without bank conflicts.
WG_STEP_BYTES = 128
#: wgmma's K per instruction in bytes (k16 fp16, k32 int8).
WG_SLICE_BYTES = 32


@dataclasses.dataclass(frozen=True)
class WgmmaDenseConfig:
    """A Hopper (sm_90a) dense configuration: ``warpgroups`` x 64 rows by ``block_n`` columns per
    block, a ring of ``stages`` 128-byte steps of K (``stages - 2`` copied ahead)."""

    name: str
    block_n: int
    stages: int
    warpgroups: int = 2

    @property
    def block_m(self) -> int:
        return 64 * self.warpgroups

    @property
    def threads(self) -> int:
        return 128 * self.warpgroups


#: 128x128 blocks of 8 warps (64x32 warp tiles, as the W4A4 kernel: 16 mma per 6 ldmatrix.x4 per
#: step, 64 accumulators a thread), 6 stages of 32-byte steps = 48 KiB (the static limit), a
#: barrier every 2 steps, so 2 barrier blocks are in flight while one is computed. On the H200 it
#: beat 4 warps of 64x64 by 2-4 % (fp16) and 7-10 % (int8) at 4096x4096, M = 1024 and 4096.
SM80 = DenseConfig("sm80", 128, 128, 2, 4, 6, False, 2)


@dataclasses.dataclass(frozen=True)
class RowTiers:
    """Kernels chosen at run time by M: each tier ``(min_m, config)`` runs from ``min_m`` rows up
    to the next tier's (tiers in decreasing ``min_m``, the last from 0); one PrimFunc, one CUDA
    kernel per tier."""

    name: str
    tiers: tuple[tuple[int, WgmmaDenseConfig], ...]


#: sm_90a by M (H100 probe, docs/bench/gemm.md): 128x256 blocks of two warpgroups (4 stages of
#: 48 KiB, 2 copied ahead) from 1024 rows; 128x128 (6 stages) from 384, where 128x256 leaves SMs
#: idle; 64x128 blocks of one warpgroup below, which at M = 16-128 run 2-3x the 128x256 speed.
SM90A = RowTiers("sm90a", ((1024, WgmmaDenseConfig("sm90a_m128n256", 256, 4)),
                           (384, WgmmaDenseConfig("sm90a_m128n128", 128, 6)),
                           (0, WgmmaDenseConfig("sm90a_m64n128", 128, 6, warpgroups=1))))
#: What the benchmark probes (`bench/gemm.py --probe`): the variants' defaults, each sm90a tier
#: alone, 128x256 with 3 stages, and for sm80 4 warps of 64x64 and a barrier per step with 5 steps
#: in flight.
PROBE_CONFIGS = {
    "sm80": SM80,
    "sm90a": SM90A,
    **{cfg.name: cfg for _, cfg in SM90A.tiers},
    "sm90a_s3": WgmmaDenseConfig("sm90a_s3", 256, 3),
    "sm80_w4": DenseConfig("sm80_w4", 128, 128, 2, 2, 6, False, 2),
    "sm80_s1": DenseConfig("sm80_s1", 128, 128, 2, 4, 6, False, 1),
}


def check_shape(N: int, K: int) -> None:
    """Refuse shapes every variant cannot take, naming what would work."""
    if N <= 0 or N % 16:
        raise UserError(f"N = {N} must be a positive multiple of 16")
    if K <= 0:
        raise UserError(f"K = {K} must be positive")


# ---------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------


def fp16_gemm_reference(x: np.ndarray, w: np.ndarray, residual=None) -> np.ndarray:
    """float16 ``[M, N]``: the exact ``x @ w.T (+ residual)`` rounded once to float16.

    Products of float16 values are exact in float64 and a float64 sum of K of them is off by at
    most ``K 2^-53`` of ``sum|x w|``, far below what the kernels' float32 sums are allowed.
    """
    acc = x.astype(np.float64) @ w.astype(np.float64).T
    if residual is not None:
        acc = acc + residual.astype(np.float64)
    with np.errstate(over="ignore"):
        return acc.astype(np.float16)


def fp16_tolerance(x: np.ndarray, w: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per-element bound on ``|y - fp16_gemm_reference|`` for a float32-accumulating kernel.

    One float16 ulp of the result (the two roundings to float16, of the kernel's float32 value and
    of the exact one, can land a whole ulp apart), plus ``K 2^-22 sum_k |x w|``: the worst case of
    a float32 sum of K terms in any order with unit roundoff up to 2^-23 (a truncating adder),
    doubled. The residual add is one more float32 rounding, inside the ulp term's slack.
    """
    K = x.shape[1]
    magnitude = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T
    ulp = np.spacing(np.abs(reference).astype(np.float16)).astype(np.float64)
    return ulp + K * 2.0**-22 * magnitude


def int8_gemm_reference(x, sx, w, sw, residual=None) -> np.ndarray:
    """float16 ``[M, N]`` in the order the module docstring fixes (numpy float32 never fuses)."""
    acc = _exact_int_dot(x, w)  # float32 of the exact sum, rounded as I2F does
    scale = sx.astype(np.float32) * sw.astype(np.float32).T
    out = acc * scale
    if residual is not None:
        out = out + residual.astype(np.float32)
    with np.errstate(over="ignore"):
        return out.astype(np.float16)


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------


def variant_for(target: tvm.target.Target) -> str:
    """``cpu``, ``sm80`` (mma.sync, sm_80 ... plain sm_90) or ``sm90a`` (wgmma): the dense GEMM
    variant a target gets."""
    from deploy.targets import SUPPORTED_ARCHS, kernel_variant

    return kernel_variant(target, "dense GEMM",
                          {arch: "sm90a" if arch == "sm_90a" else "sm80" for arch in SUPPORTED_ARCHS})


def fp16_gemm(target: tvm.target.Target, N: int, K: int, residual: bool = False, cfg=None) -> tvm.tirx.PrimFunc:
    """``y = x @ w.T (+ residual)`` in float16 with float32 sums, for any M (dynamic).

    PrimFunc arguments: ``x, w``, then ``residual`` if asked for, then ``y``. ``cfg`` overrides
    the CUDA tiling of the target's variant (the benchmark's probes); llvm ignores it.
    """
    return _dense_gemm(FP16, target, N, K, residual, cfg)


def int8_gemm(target: tvm.target.Target, N: int, K: int, residual: bool = False, cfg=None) -> tvm.tirx.PrimFunc:
    """``y = (x @ w.T) * sx * sw (+ residual)`` from int8 codes, int32 sums, for any M (dynamic).

    PrimFunc arguments: ``x, sx, w, sw``, then ``residual`` if asked for, then ``y``.
    """
    return _dense_gemm(INT8, target, N, K, residual, cfg)


def _dense_gemm(op: Operand, target, N: int, K: int, residual: bool, cfg) -> tvm.tirx.PrimFunc:
    check_shape(N, K)
    variant = variant_for(target)
    if variant == "cpu":
        return _with_signature(op, N, K, residual, _cpu_body(op, N, K, residual), f"{op.name}_gemm_cpu")
    cfg = cfg or PROBE_CONFIGS[variant]
    if isinstance(cfg, DenseConfig):
        kernel = _cuda_body(op, N, K, residual, cfg)
    elif isinstance(cfg, WgmmaDenseConfig):
        kernel = _wgmma_body(op, N, K, residual, cfg)
    else:
        kernel = by_rows([(lambda M, min_m=min_m: M >= min_m, _wgmma_body(op, N, K, residual, tier))
                          for min_m, tier in cfg.tiers])
    return _with_signature(op, N, K, residual, kernel, kernel_name(op, cfg, residual))


def kernel_name(op: Operand, cfg, residual: bool) -> str:
    """``<fp16|int8>_gemm_<config>[_residual]``: the PrimFunc's global symbol."""
    return f"{op.name}_gemm_{cfg.name}" + ("_residual" if residual else "")


def _with_signature(op: Operand, N: int, K: int, residual: bool, kernel, name: str) -> tvm.tirx.PrimFunc:
    """``kernel(M, X, SX, W, SW, R, Y)`` on the matched buffers, as a PrimFunc with the arguments of
    `fp16_gemm` / `int8_gemm` (fp16 has no scales: its kernels never read ``SX``/``SW``, and get
    ``X``/``W`` there; without a residual ``R`` is ``Y``, never read)."""

    @T.macro
    def body(x, sx, w, sw, res, y):
        M = T.int32()
        X = T.match_buffer(x, (M, K), op.dtype)
        W = T.match_buffer(w, (N, K), op.dtype)
        SX = T.match_buffer(sx, (M, 1), "float16") if op is INT8 else X
        SW = T.match_buffer(sw, (N, 1), "float16") if op is INT8 else W
        Y = T.match_buffer(y, (M, N), "float16")
        R = T.match_buffer(res, (M, N), "float16") if residual else Y
        kernel(M, X, SX, W, SW, R, Y)

    if op is INT8 and residual:

        @T.prim_func
        def func(x: T.handle, sx: T.handle, w: T.handle, sw: T.handle, res: T.handle, y: T.handle):
            body(x, sx, w, sw, res, y)

    elif op is INT8:

        @T.prim_func
        def func(x: T.handle, sx: T.handle, w: T.handle, sw: T.handle, y: T.handle):
            body(x, sx, w, sw, y, y)

    elif residual:

        @T.prim_func
        def func(x: T.handle, w: T.handle, res: T.handle, y: T.handle):
            body(x, x, w, w, res, y)

    else:

        @T.prim_func
        def func(x: T.handle, w: T.handle, y: T.handle):
            body(x, x, w, w, y, y)

    return func.with_attr("global_symbol", name)


def _epilogue_value(op: Operand, acc, row, col, SX, SW, cuda: bool):
    """float32 of one output before the residual: the sum (fp16), or ``f32(acc) * (sx * sw)``
    (int8); on CUDA as ``__fmul_rn``, which nvcc never contracts with the residual add into an
    FMA (the CPU body stores the product instead)."""
    if op is FP16:
        return acc
    scale = T.Cast("float32", SX[row, 0]) * T.Cast("float32", SW[col, 0])
    if cuda:
        return T.call_pure_extern("float32", "__fmul_rn", T.Cast("float32", acc), scale)
    return T.Cast("float32", acc) * scale


# ---------------------------------------------------------------------------------------------
# cpu
# ---------------------------------------------------------------------------------------------

#: Output columns one CPU task owns: a 16-lane float32 / int32 vector (N % 16 == 0).
_CPU_PANEL = 16


def _cpu_body(op: Operand, N: int, K: int, residual: bool):
    """llvm TIR: per panel of 16 columns, the weights once into a k-major panel of accumulator
    type, then every row of x streamed over it. The int8 scaled product is stored before the
    residual is added, so LLVM cannot contract the two into an FMA (the reference rounds both)."""
    P = _CPU_PANEL
    ACC = op.acc_dtype

    @T.macro
    def body(M, X, SX, W, SW, R, Y):
        for panel in T.parallel(N // P):
            n0 = panel * P
            wp = T.alloc_buffer((K, P), ACC)
            acc = T.alloc_buffer((P,), ACC)
            out = T.alloc_buffer((P,), "float32")
            for k, j in T.grid(K, P):
                wp[k, j] = T.Cast(ACC, W[n0 + j, k])
            for m in range(M):
                for j in T.vectorized(P):
                    acc[j] = T.Cast(ACC, 0)
                for k in range(K):
                    xk = T.Cast(ACC, X[m, k])
                    for j in T.vectorized(P):
                        acc[j] = acc[j] + xk * wp[k, j]
                for j in T.vectorized(P):
                    out[j] = _epilogue_value(op, acc[j], m, n0 + j, SX, SW, False)
                for j in T.vectorized(P):
                    if residual:
                        Y[m, n0 + j] = T.Cast("float16", out[j] + T.Cast("float32", R[m, n0 + j]))
                    else:
                        Y[m, n0 + j] = T.Cast("float16", out[j])

    return body


# ---------------------------------------------------------------------------------------------
# sm80: the tiled tensor-core kernel
# ---------------------------------------------------------------------------------------------


def _cuda_body(op: Operand, N: int, K: int, residual: bool, cfg: DenseConfig):
    """The skeleton of `gemm_common.w4a4_cuda_prim_func` without groups::

        grid (ceil(N / BN), ceil(M / BM)), one block of WM x WN warps
        K in 32-byte steps, taken in barrier blocks of `block_steps` steps; per block:
            wait for its stages, one barrier, cp.async the block `stages/block_steps - 1` ahead
            per step: ldmatrix (`fragment_loader`) and one mma.sync per 16x8 tile
        y = f16(acc, scaled for int8 (+ residual))

    Rows past M (columns past N) are not copied; their stale shared memory only reaches outputs
    that are not stored (an output row depends on its own x row alone, a column on its w row).
    """
    BM, BN, S, THREADS = cfg.block_m, cfg.block_n, cfg.stages, cfg.threads
    MI, NI, SPB = cfg.m_frags, cfg.n_frags, cfg.block_steps
    TM, TN = BM // cfg.warps_m, BN // cfg.warps_n
    CHUNK_ELEMS = 16 // op.bytes  # elements in one 16-byte cp.async
    if (K * op.bytes) % (STEP_BYTES * SPB):
        raise UserError(f"the CUDA {op.name} GEMM needs K to be a multiple of {STEP_BYTES * SPB // op.bytes}, "
                        f"got K = {K}")
    BLOCKS = K * op.bytes // STEP_BYTES // SPB
    IN_FLIGHT = S // SPB - 1
    ROW_CHUNKS = 2 * SPB  # 16-byte chunks of one row in a barrier block
    CHUNK_ROUNDS = -(-(BM + BN) * ROW_CHUNKS // THREADS)
    ACC = MI * NI * 4
    load_fragments = fragment_loader(cfg)

    @T.macro
    def copy_block(block, tx, m0, n0, M, X, W, tile_a, tile_w):
        """cp.async barrier block `block` into its stages, one 16-byte chunk per thread and
        round; consecutive threads take consecutive chunks of a row (64 contiguous bytes)."""
        for r in T.unroll(CHUNK_ROUNDS):
            c = tx + r * THREADS
            row = c // ROW_CHUNKS
            step = block * SPB + c % ROW_CHUNKS // 2
            half = c % 2
            col = (step * 2 + half) * CHUNK_ELEMS
            if row < BM:
                if m0 + row < M:
                    dst = tile_a.ptr_to([step % S * BM * STEP_BYTES + _swizzle(row, half)])
                    T.evaluate(T.ptx["cp.async.cg.shared.global"](dst, X.ptr_to([m0 + row, col]), 16))
            elif row < BM + BN:
                if n0 + row - BM < N:
                    dst = tile_w.ptr_to([step % S * BN * STEP_BYTES + _swizzle(row - BM, half)])
                    T.evaluate(T.ptx["cp.async.cg.shared.global"](dst, W.ptr_to([n0 + row - BM, col]), 16))

    @T.macro
    def body(M, X, SX, W, SW, R, Y):
        bx = T.launch_thread("blockIdx.x", -(-N // BN))
        by = T.launch_thread("blockIdx.y", T.ceildiv(M, BM))
        tx = T.launch_thread("threadIdx.x", THREADS)
        tile_a = T.alloc_buffer((S * BM * STEP_BYTES,), "uint8", scope="shared")
        tile_w = T.alloc_buffer((S * BN * STEP_BYTES,), "uint8", scope="shared")
        frag_a = T.alloc_buffer((MI * 4,), "uint32", scope="local")
        frag_w = T.alloc_buffer((NI * 2,), "uint32", scope="local")
        acc = T.alloc_buffer((ACC,), op.acc_dtype, scope="local")

        m0 = by * BM
        n0 = bx * BN
        lane = tx % 32
        warp_m = tx // 32 // cfg.warps_n * TM
        warp_n = tx // 32 % cfg.warps_n * TN
        copy_args = (tx, m0, n0, M, X, W, tile_a, tile_w)

        for i in T.unroll(ACC):
            acc[i] = T.Cast(op.acc_dtype, 0)
        for block in T.unroll(IN_FLIGHT):
            if block < BLOCKS:
                copy_block(block, *copy_args)
            T.evaluate(T.ptx["cp.async.commit_group"]())

        for block in T.serial(BLOCKS):
            # Blocks 0..block have landed once at most IN_FLIGHT - 1 younger groups are pending;
            # the barrier also retires every read of the stages refilled next (block - 1's).
            T.evaluate(T.ptx["cp.async.wait_group"](IN_FLIGHT - 1))
            T.tvm_storage_sync("shared")
            if block + IN_FLIGHT < BLOCKS:
                copy_block(block + IN_FLIGHT, *copy_args)
            T.evaluate(T.ptx["cp.async.commit_group"]())
            # One straight run of code per block, so nvcc can load the next step's fragments
            # while the tensor cores work on this one.
            for h in T.unroll(SPB):
                load_fragments((block * SPB + h) % S, lane, warp_m, warp_n, tile_a, tile_w, frag_a, frag_w)
                for mi in T.unroll(MI):
                    for ni in T.unroll(NI):
                        T.evaluate(_mma(op.mma_shape, op.ptx_dtype, frag_a, mi * 4, frag_w, ni * 2, acc,
                                        (mi * NI + ni) * 4, op.ptx_acc))

        # Unrolled, so that every accumulator index is a constant and acc stays in registers.
        for mi in T.unroll(MI):
            for ni in T.unroll(NI):
                for hh in T.unroll(2):
                    row = m0 + warp_m + mi * 16 + lane // 4 + hh * 8
                    col = n0 + warp_n + ni * 8 + lane % 4 * 2
                    if row < M and col < N:
                        for e in T.unroll(2):
                            value = _epilogue_value(op, acc[(mi * NI + ni) * 4 + hh * 2 + e], row, col + e,
                                                    SX, SW, True)
                            if residual:
                                Y[row, col + e] = T.Cast("float16", value + T.Cast("float32", R[row, col + e]))
                            else:
                                Y[row, col + e] = T.Cast("float16", value)

    return body


# ---------------------------------------------------------------------------------------------
# sm90a: wgmma with both operands in 128-byte-swizzled shared memory
# ---------------------------------------------------------------------------------------------

def _wgmma_body(op: Operand, N: int, K: int, residual: bool, cfg: WgmmaDenseConfig):
    """sm_90a::

        grid (ceil(N / BN), ceil(M / BM)), one block of `warpgroups` warpgroups, each 64 rows x BN
        K in 128-byte steps through a ring of S stages of [A rows | W rows], 128-byte swizzled
        per step: wait for its copies, fence (cp.async writes -> wgmma's async proxy), barrier,
            cp.async step + S - 2 into the stage step - 2 used (its wgmmas are done: every
            thread waited for them before this barrier), then 4 wgmma k-slices, committed, and
            wait until only this step's are in flight
        y = f16(acc, scaled for int8 (+ residual))

    Rows past M or N and chunks past K are zero-filled (cp.async ignore-src), so a K that is not
    a multiple of the step adds zero products.
    """
    BM, BN, S, THREADS = cfg.block_m, cfg.block_n, cfg.stages, cfg.threads
    if (K * op.bytes) % 16:
        raise UserError(f"the sm90a {op.name} GEMM needs K to be a multiple of {16 // op.bytes}, got K = {K}")
    CHUNK = 16 // op.bytes
    K_CHUNKS = K * op.bytes // 16
    STEPS = -(-K * op.bytes // WG_STEP_BYTES)
    STAGE = (BM + BN) * WG_STEP_BYTES
    W_AT = BM * WG_STEP_BYTES
    ROWS_PER_ROUND = THREADS // 8
    A_ROUNDS = BM // ROWS_PER_ROUND
    ROUNDS = (BM + BN) // ROWS_PER_ROUND
    SLICES = WG_STEP_BYTES // WG_SLICE_BYTES
    # int8 has no m64n256k32 in TVM's table: two n128 halves, each its own accumulator registers.
    N_PARTS = 1 if op is FP16 else BN // 128
    PART_N = BN // N_PARTS
    PART_ACC = PART_N // 2
    ACC = BN // 2
    ACC_DTYPE = "float32" if op is FP16 else "uint32"
    WGMMA = (f"wgmma.mma_async.sync.aligned.m64n{PART_N}k16.f32.f16.f16" if op is FP16
             else f"wgmma.mma_async.sync.aligned.m64n{PART_N}k32.s32.s8.s8")
    if S < 3 or BN % 128 or (op is FP16 and BN > 256):
        raise ValueError(f"{cfg.name}: needs 3 or more stages and block_n a multiple of 128")

    @T.macro
    def copy_step(step, tx, m0, n0, M, X, W, dense_smem):
        """cp.async step `step` into its stage: thread t copies chunk t % 8 of rows t // 8 + r
        THREADS / 8; the swizzled chunk depends on the row only through row % 8, i.e. t // 8 % 8."""
        chunk = tx % 8
        swizzled = T.bitwise_xor(chunk, tx // 8 % 8) * 16
        k_chunk = step * 8 + chunk
        k = T.min(k_chunk, K_CHUNKS - 1) * CHUNK
        for r in T.unroll(ROUNDS):
            row = tx // 8 + r * ROWS_PER_ROUND
            dst = dense_smem.ptr_to([step % S * STAGE + row * WG_STEP_BYTES + swizzled])
            if r < A_ROUNDS:
                skip = T.Cast("int32", T.Or(m0 + row >= M, k_chunk >= K_CHUNKS))
                T.evaluate(_copy16_unless(dst, X.ptr_to([T.min(m0 + row, M - 1), k]), skip))
            else:
                skip = T.Cast("int32", T.Or(n0 + row - BM >= N, k_chunk >= K_CHUNKS))
                T.evaluate(_copy16_unless(dst, W.ptr_to([T.min(n0 + row - BM, N - 1), k]), skip))

    @T.macro
    def issue_step(step, warpgroup, dense_smem, a_desc, b_desc, acc):
        """The step's 4 k-slices: descriptors of 128-byte-swizzled K-major tiles (stride 1024
        bytes between 8-row groups; a k-slice starts 32 bytes further into each row)."""
        T.evaluate(T.ptx["wgmma.fence.sync.aligned"]())
        for j in T.unroll(SLICES):
            base = step % S * STAGE + j * WG_SLICE_BYTES
            T.evaluate(T.cuda.wgmma.encode_matrix_descriptor(
                a_desc.ptr_to([0]), dense_smem.ptr_to([base + warpgroup * 64 * WG_STEP_BYTES]), 1, 64, 3))
            for p in T.unroll(N_PARTS):
                T.evaluate(T.cuda.wgmma.encode_matrix_descriptor(
                    b_desc.ptr_to([0]), dense_smem.ptr_to([base + W_AT + p * PART_N * WG_STEP_BYTES]), 1, 64, 3))
                if op is FP16:
                    T.evaluate(T.ptx[WGMMA](*[acc[p * PART_ACC + i] for i in range(PART_ACC)],
                                            a_desc[0], b_desc[0], True, 1, 1, 0, 0))
                else:
                    T.evaluate(T.ptx[WGMMA](*[acc[p * PART_ACC + i] for i in range(PART_ACC)],
                                            a_desc[0], b_desc[0], True))
        T.evaluate(T.ptx["wgmma.commit_group.sync.aligned"]())

    @T.macro
    def body(M, X, SX, W, SW, R, Y):
        bx = T.launch_thread("blockIdx.x", -(-N // BN))
        by = T.launch_thread("blockIdx.y", T.ceildiv(M, BM))
        tx = T.launch_thread("threadIdx.x", THREADS)
        dense_smem = T.alloc_buffer((S * STAGE,), "uint8", scope="shared.dyn")
        a_desc = T.alloc_buffer((1,), "uint64", scope="local")
        b_desc = T.alloc_buffer((1,), "uint64", scope="local")
        acc = T.alloc_buffer((ACC,), ACC_DTYPE, scope="local")

        m0 = by * BM
        n0 = bx * BN
        warpgroup = tx // 128
        copy_args = (tx, m0, n0, M, X, W, dense_smem)

        for i in T.unroll(ACC):
            acc[i] = T.Cast(ACC_DTYPE, 0)
        for step in T.unroll(S - 2):
            if step < STEPS:
                copy_step(step, *copy_args)
            T.evaluate(T.ptx["cp.async.commit_group"]())
        for step in T.serial(STEPS):
            T.evaluate(T.ptx["cp.async.wait_group"](S - 3))
            T.evaluate(T.ptx["fence.proxy.async.shared::cta"]())
            T.tvm_storage_sync("shared")
            if step + S - 2 < STEPS:
                copy_step(step + S - 2, *copy_args)
            T.evaluate(T.ptx["cp.async.commit_group"]())
            issue_step(step, warpgroup, dense_smem, a_desc, b_desc, acc)
            T.evaluate(T.ptx["wgmma.wait_group.sync.aligned"](1))
        T.evaluate(T.ptx["wgmma.wait_group.sync.aligned"](0))

        # The accumulator of m64nBN: warp w of the warpgroup holds rows 16w .. 16w+15 in the
        # mma.sync C layout, 8-column tile j at acc[4j .. 4j+3].
        lane = tx % 32
        for j in T.unroll(BN // 8):
            for hh in T.unroll(2):
                row = m0 + warpgroup * 64 + tx % 128 // 32 * 16 + lane // 4 + hh * 8
                col = n0 + j * 8 + lane % 4 * 2
                if row < M and col < N:
                    for e in T.unroll(2):
                        raw = acc[j * 4 + hh * 2 + e]
                        total = raw if op is FP16 else T.reinterpret("int32", raw)
                        value = _epilogue_value(op, total, row, col + e, SX, SW, True)
                        if residual:
                            Y[row, col + e] = T.Cast("float16", value + T.Cast("float32", R[row, col + e]))
                        else:
                            Y[row, col + e] = T.Cast("float16", value)

    return body


# ---------------------------------------------------------------------------------------------
# Building standalone CUDA libraries (tests, benchmarks)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DenseSpec:
    """One CUDA dense-GEMM library to build: ``op`` "fp16" or "int8", for ``archs``, with the
    tiling `PROBE_CONFIGS[config]` (by default the one of the archs' variant)."""

    op: str
    archs: tuple[str, ...]
    N: int
    K: int
    residual: bool
    config: str = ""

    def tiling(self) -> str:
        """The `PROBE_CONFIGS` key built: ``config``, or the variant of the archs' target."""
        from deploy.targets import make_target

        return self.config or variant_for(make_target("cuda", list(self.archs)))

    def function_name(self) -> str:
        return kernel_name(FP16 if self.op == "fp16" else INT8, PROBE_CONFIGS[self.tiling()], self.residual)

    def file_name(self) -> str:
        return f"{self.op}_{self.tiling()}_{'-'.join(self.archs)}_N{self.N}_K{self.K}_r{int(self.residual)}.so"


def build_dense_kernel(spec: DenseSpec, out_dir: str) -> str:
    """Compile ``spec`` with nvcc (SASS for each arch, PTX of the lowest) and export it; for
    `gemm_common.build_kernels(..., build=build_dense_kernel)`."""
    import os

    from atom_tvm.cuda_build import compile_cuda
    from deploy.targets import make_target

    make = fp16_gemm if spec.op == "fp16" else int8_gemm
    func = make(make_target("cuda", list(spec.archs)), spec.N, spec.K, spec.residual, PROBE_CONFIGS[spec.tiling()])
    executable = compile_cuda(func, spec.archs)
    path = os.path.join(out_dir, spec.file_name())
    executable.export_library(path)
    return path
