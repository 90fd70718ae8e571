"""Atom's W4A4 GEMM: INT4 activations x INT4 weights in groups, plus an INT8 outlier block.

Operands (the layouts of `atom_tvm.quantization.formats`, row-major, K split as
``K = (K - O) normal channels + O outliers``, group size ``G``)::

    a_q4 uint8 [M, (K-O)/2]   a_s4 float16 [M, (K-O)/G]   a_q8 int8 [M, O]   a_s8 float16 [M, 1]
    w_q4 uint8 [N, (K-O)/2]   w_s4 float16 [N, (K-O)/G]   w_q8 int8 [N, O]   w_s8 float16 [N, 1]
    residual float16 [M, N] (optional)  ->  y float16 [M, N]

Numerics, in this exact order (the reference below is the definition; the ``cpu`` build matches it
bit for bit; the CUDA builds match it with each ``acc + p * s`` rounded once, as the FMA nvcc
contracts it into, i.e. `w4a4_gemm_reference(..., fused=True)` bit for bit, which is within one
float16 ulp of the unfused order except where a sum cancels)::

    acc = 0.0f                                                     # float32
    for g in 0 .. (K-O)/G - 1:                                     # groups in order
        isum = sum_{k in group g} qa[m,k] * qw[n,k]                # exact int32
        acc  = acc + f32(isum) * (f32(a_s4[m,g]) * f32(w_s4[n,g]))
    if O > 0:                                                      # no outlier term when O == 0
        isum = sum_{k < O} a_q8[m,k] * w_q8[n,k]                   # exact int32
        acc  = acc + f32(isum) * (f32(a_s8[m]) * f32(w_s8[n]))
    y = f16(acc)          or, with a residual,   y = f16(acc + f32(residual[m,n]))

``f32(int)`` and ``f16(float)`` round to nearest even. Integer sums are exact, so their order is
free; the float32 operations are not, which is why every variant walks the groups in order and
keeps each group's integer sum whole before scaling it.

Variants, chosen from the target by `w4a4_gemm`:

* ``cpu`` (llvm): the bit-exact twin of the reference, parallel over column panels and
  vectorized along them.
* ``sm90_wgmma`` (sm_90a): Hopper has no INT4 tensor cores; the packed bytes travel to shared
  memory as they are and are widened to INT8 (A in registers, W into a second shared tile) for
  the warpgroup ``wgmma.mma_async m64n128k32 s8``.
* ``sm90_int8`` (plain sm_90, which may not use wgmma): the same widening for ``mma.sync m16n8k32 s8``.
* ``sm80_int4`` (sm_80/86/89): the same kernel with the native ``mma.sync m16n8k64 s4``.
* ``gemv`` (`w4a4_gemv`, any CUDA arch, small M): the same pieces on 16-row tiles with K split
  across the warps of a block, for decode, where the weight bytes are the cost; the integer
  group sums are combined in group order, so it is bit-exact to the same fused reference.

`w4a4_linear` is what a model calls: on CUDA one PrimFunc holding the ``gemv`` kernel and the
target's tiled kernel (on sm_90a also one-warpgroup blocks of it, 64x64 or 64x128, for up to a few
hundred rows), chosen at run time by M (`linear_tiers`: batched decode only knows M, the batch,
when it runs); on llvm the CPU kernel.

The CUDA kernels live in `tir_kernels.gemm_common`; this module holds the numerics, the CPU twin
and the dispatch.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tvm
from tvm.script import tirx as T

from atom_tvm.errors import UserError
from deploy.targets import kernel_variant
from atom_tvm.quantization.formats import GROUP_SIZES, AtomActivation, AtomWeight, unpack_int4

#: The kernel's inputs in call order; ``residual`` (if built with one) and ``y`` follow.
ARG_NAMES = ("a_q4", "a_s4", "a_q8", "a_s8", "w_q4", "w_s4", "w_q8", "w_s8")
#: The kernels `w4a4_linear` holds, per CUDA variant, in order of M: ``(config, max_blocks,
#: max_rows)``, each taking M while its grid, ceil(M / rows) x ceil(N / columns) blocks, has at
#: most ``max_blocks`` and M is at most ``max_rows`` (the gemv: 16 x 16 blocks, and always M <=
#: 16), the last any larger M. The gemv reads the weights once per 16 rows, a tiled kernel once per
#: block row, but a tiled block walks all of K one group after another, so a grid of few blocks
#: leaves SMs idle. Measured on an H100 (132 SMs, as the H200; docs/bench/gemm.md, "Session 9"):
#: the gemv wins to about 1024 blocks (M = 64 at N = 4096) against 64x64 wgmma blocks, which win
#: to about 264 blocks (two per SM; M = 256 at N = 4096) against 128x128 ones; on weights too wide
#: for that (N > 16896), 64x128 blocks win for one block row. Without these tiers (mma.sync
#: variants, not measured) the gemv met 128x128 blocks at about 2048 blocks.
LINEAR_TIERS = {
    "sm90_wgmma": (("gemv", 1024, None), ("sm90_wgmma_64", 264, None), ("sm90_wgmma_64x128", 264, 64),
                   ("sm90_wgmma", None, None)),
    "sm90_int8": (("gemv", 2048, None), ("sm90_int8", None, None)),
    "sm80_int4": (("gemv", 2048, None), ("sm80_int4", None, None)),
}


@dataclasses.dataclass(frozen=True)
class W4A4Shape:
    """The static part of a W4A4 GEMM: ``N`` outputs, ``K`` inputs, group ``G``, ``O`` outliers."""

    N: int
    K: int
    G: int
    O: int

    @property
    def normal(self) -> int:
        """INT4 channels ``K - O``."""
        return self.K - self.O

    @property
    def groups(self) -> int:
        return self.normal // self.G

    @property
    def packed(self) -> int:
        """Bytes of one packed INT4 row."""
        return self.normal // 2

    def check(self) -> None:
        """Refuse shapes the kernels are not built for, naming what would work."""
        if self.G not in GROUP_SIZES:
            raise UserError(f"group size {self.G} is not supported; use 64 or 128")
        if self.N <= 0 or self.N % self.G:
            raise UserError(f"N = {self.N} must be a positive multiple of the group size {self.G}")
        if not 0 <= self.O <= self.K or self.normal % self.G:
            raise UserError(
                f"K - O = {self.K} - {self.O} must be a non-negative multiple of the group size {self.G}"
            )


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------


def w4a4_gemm_reference(
    a_q4, a_s4, a_q8, a_s8, w_q4, w_s4, w_q8, w_s8, group_size: int, residual=None, fused=False
) -> np.ndarray:
    """float16 ``[M, N]`` in the order the module docstring fixes (numpy float32 never fuses).

    ``fused=True`` rounds each ``acc + f32(isum) * s`` once, as the FMA nvcc contracts it into:
    the CUDA kernels match that bit for bit, and the plain reference within a float16 ulp.
    """
    rows, cols = a_q4.shape[0], w_q4.shape[0]
    sa, sw = a_s4.astype(np.float32), w_s4.astype(np.float32)
    qa, qw = unpack_int4(a_q4), unpack_int4(w_q4)
    step = _fma32 if fused else lambda x, s, acc: acc + x * s
    acc = np.zeros((rows, cols), np.float32)
    for g in range(a_s4.shape[1]):
        cut = slice(g * group_size, (g + 1) * group_size)
        isum = _exact_int_dot(qa[:, cut], qw[:, cut])
        acc = step(isum, sa[:, g, None] * sw[None, :, g], acc)
    if a_q8.shape[1]:
        isum = _exact_int_dot(a_q8, w_q8)
        acc = step(isum, a_s8.astype(np.float32) * w_s8.astype(np.float32).T, acc)
    if residual is not None:
        acc = acc + residual.astype(np.float32)
    with np.errstate(over="ignore"):
        return acc.astype(np.float16)


def _fma32(x: np.ndarray, s: np.ndarray, acc: np.ndarray) -> np.ndarray:
    """float32 ``fma(x, s, acc)``, rounded once, for arrays.

    ``x * s`` is exact in float64 and TwoSum gives the float64 sum ``t`` with its exact error
    ``e``. Rounding ``t`` to float32 is then correct unless ``t`` sits exactly on a float32
    midpoint (no other midpoint can lie between ``t`` and the exact sum, since midpoints are
    float64 numbers); there ``e`` breaks the tie.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        p = x.astype(np.float64) * s.astype(np.float64)
        c = np.broadcast_to(acc, p.shape).astype(np.float64)
        t = p + c
        back = t - p
        e = (p - (t - back)) + (c - back)
        r = t.astype(np.float32)
        toward = np.nextafter(r, np.where(t > r, np.float32(np.inf), np.float32(-np.inf)))
        midpoint = (r.astype(np.float64) + toward.astype(np.float64)) * 0.5 == t
        nudge = midpoint & (e != 0) & np.isfinite(t)
        r = np.where(nudge & ((e > 0) == (toward > r)), toward, r)
    return r


def _exact_int_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``f32(sum_k a[m,k] b[n,k])`` as I2F rounds the exact int32 sum.

    A BLAS product of integer-valued floats is exact while every partial sum stays below
    2^24 (float32) or 2^53 (float64); float32 is used when the bound allows it (INT4 groups).
    """
    bound = a.shape[1] * float(np.abs(a).max(initial=0)) * float(np.abs(b).max(initial=0))
    exact = np.float32 if bound < 2**24 else np.float64
    return (a.astype(exact) @ b.astype(exact).T).astype(np.float32)


def reference_from_atom(a: AtomActivation, w: AtomWeight, residual=None) -> np.ndarray:
    """`w4a4_gemm_reference` of a quantized activation and weight."""
    if (a.group_size, a.n_outliers) != (w.group_size, w.n_outliers):
        raise UserError("activation and weight are quantized with different group sizes or outliers")
    return w4a4_gemm_reference(
        a.q4, a.s4, a.q8, a.s8, w.q4, w.s4, w.q8, w.s8, a.group_size, residual
    )


def atom_args(a: AtomActivation, w: AtomWeight) -> list[np.ndarray]:
    """The kernel inputs of `ARG_NAMES`, in order, from the quantized tensors."""
    return [a.q4, a.s4, a.q8, a.s8, w.q4, w.s4, w.q8, w.s8]


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------


def variant_for(target: tvm.target.Target) -> str:
    """``cpu``, ``sm80_int4``, ``sm90_int8`` (plain sm_90: mma.sync) or ``sm90_wgmma`` (sm_90a): the
    GEMM variant a target gets."""
    return kernel_variant(target, "W4A4 GEMM", {"sm_80": "sm80_int4", "sm_86": "sm80_int4", "sm_89": "sm80_int4",
                                                "sm_90": "sm90_int8", "sm_90a": "sm90_wgmma"})


def w4a4_gemm(
    target: tvm.target.Target, N: int, K: int, G: int, O: int = 128, residual: bool = False
) -> tvm.tirx.PrimFunc:
    """The W4A4 GEMM for any M (dynamic), built for ``target``'s variant.

    Arguments of the PrimFunc: the eight `ARG_NAMES` buffers, then ``residual`` if asked for,
    then ``y``. With ``O == 0`` pass the empty ``[rows, 0]`` outlier arrays the formats produce.
    """
    shape = W4A4Shape(N, K, G, O)
    shape.check()
    variant = variant_for(target)
    if variant == "cpu":
        return cpu_prim_func(shape, residual)
    from tir_kernels import gemm_common

    return gemm_common.w4a4_cuda_prim_func(shape, residual, gemm_common.TILED[variant])


def linear_tiers(variant: str, N: int) -> list:
    """``[(max_m, config), ..., (None, config)]``: the kernels of `w4a4_linear` on a CUDA variant for
    N output columns (`LINEAR_TIERS`), each for M above the previous max_m and up to its own; a
    tier left with no rows is dropped."""
    from tir_kernels import gemm_common

    configs = {"gemv": gemm_common.GEMV, "sm90_wgmma_64": gemm_common.WGMMA_64,
               "sm90_wgmma_64x128": gemm_common.WGMMA_64x128, **gemm_common.TILED}
    tiers, below = [], 0
    for name, max_blocks, max_rows in LINEAR_TIERS[variant]:
        cfg = configs[name]
        if max_blocks is None:
            tiers.append((None, cfg))
            break
        if name == "gemv":
            max_m = 16 * max(1, max_blocks // -(-N // gemm_common.GEMV_BLOCK_N))
        else:
            max_m = cfg.block_m * (max_blocks // -(-N // cfg.block_n))
        max_m = min(max_m, max_rows or max_m)
        if max_m > below:
            tiers.append((max_m, cfg))
            below = max_m
    return tiers


def w4a4_linear(
    target: tvm.target.Target, N: int, K: int, G: int, O: int = 128, residual: bool = False
) -> tvm.tirx.PrimFunc:
    """The W4A4 kernel for a model's linear layers, any M; same arguments as `w4a4_gemm`.

    On CUDA: the ``gemv`` kernel for small M and the target's tiled kernel(s) above
    (`linear_tiers`), in one PrimFunc that picks at run time (all are bit-exact to the fused
    reference, so the choice never changes a result). On llvm: the CPU GEMM.
    """
    shape = W4A4Shape(N, K, G, O)
    shape.check()
    variant = variant_for(target)
    if variant == "cpu":
        return cpu_prim_func(shape, residual)
    from tir_kernels import gemm_common

    return gemm_common.w4a4_linear_prim_func(shape, residual, linear_tiers(variant, N))


def w4a4_gemv(
    target: tvm.target.Target, N: int, K: int, G: int, O: int = 128, residual: bool = False
) -> tvm.tirx.PrimFunc:
    """The small-M W4A4 kernel alone, for a CUDA target; same arguments as `w4a4_gemm`.

    It runs for any M, in tiles of 16 rows that each read all the weights, so it pays off for
    small M only (`w4a4_linear` runs it up to the M of `linear_tiers`). On llvm it is the CPU GEMM
    (the CPU kernel is already row-streaming).
    """
    shape = W4A4Shape(N, K, G, O)
    shape.check()
    if variant_for(target) == "cpu":
        return w4a4_gemm(target, N, K, G, O, residual)
    from tir_kernels import gemm_common

    return gemm_common.w4a4_gemv_prim_func(shape, residual)


# ---------------------------------------------------------------------------------------------
# cpu: the bit-exact twin
# ---------------------------------------------------------------------------------------------

#: Output columns one CPU task owns: a 16-lane int16 / float32 vector, and N % 16 == 0 always.
_CPU_PANEL = 16


def cpu_prim_func(shape: W4A4Shape, residual: bool) -> tvm.tirx.PrimFunc:
    """llvm TIR: per panel of 16 columns, decode the weights once into a k-major int16 panel, then
    stream every row of A over it with the 16 columns in one vector.

    INT4 products are at most 64 and a group of 128 sums to at most 8192, so the group sums fit
    int16 (SSE2 multiplies 8 of them per instruction); outlier sums need int32.
    """
    N, G, O, KN, NG = shape.N, shape.G, shape.O, shape.normal, shape.groups
    P = _CPU_PANEL

    @T.macro
    def body(M, A4, AS4, A8, AS8, W4, WS4, W8, WS8, R, Y):
        for panel in T.parallel(N // P):
            n0 = panel * P
            wq = T.alloc_buffer((KN, P), "int16")
            ws = T.alloc_buffer((NG, P), "float32")
            wo = T.alloc_buffer((O, P), "int32")
            wos = T.alloc_buffer((P,), "float32")
            for k, j in T.grid(KN, P):
                wq[k, j] = _nibble(W4[n0 + j, k // 2], k % 2)
            for g, j in T.grid(NG, P):
                ws[g, j] = T.Cast("float32", WS4[n0 + j, g])
            for k, j in T.grid(O, P):
                wo[k, j] = T.Cast("int32", W8[n0 + j, k])
            for j in range(P):
                wos[j] = T.Cast("float32", WS8[n0 + j, 0])
            # Each scaled group sum is stored before it is added: LLVM contracts a multiply
            # feeding an add into an FMA wherever the target has one (mattr or -mcpu=native),
            # and the reference rounds the product first. Summing loaded values cannot fuse.
            prod = T.alloc_buffer((NG + 1, P), "float32")
            acc = T.alloc_buffer((P,), "float32")
            isum = T.alloc_buffer((P,), "int16")
            osum = T.alloc_buffer((P,), "int32")
            for m in range(M):
                for g in range(NG):
                    for j in T.vectorized(P):
                        isum[j] = T.int16(0)
                    for kk in range(G):
                        qa = _nibble(A4[m, (g * G + kk) // 2], kk % 2)
                        for j in T.vectorized(P):
                            isum[j] = isum[j] + qa * wq[g * G + kk, j]
                    sa = T.Cast("float32", AS4[m, g])
                    for j in T.vectorized(P):
                        prod[g, j] = T.Cast("float32", isum[j]) * (sa * ws[g, j])
                if O > 0:
                    for j in T.vectorized(P):
                        osum[j] = 0
                    for k in range(O):
                        qa8 = T.Cast("int32", A8[m, k])
                        for j in T.vectorized(P):
                            osum[j] = osum[j] + qa8 * wo[k, j]
                    sa8 = T.Cast("float32", AS8[m, 0])
                    for j in T.vectorized(P):
                        prod[NG, j] = T.Cast("float32", osum[j]) * (sa8 * wos[j])
                for j in T.vectorized(P):
                    acc[j] = T.float32(0)
                for g in range(NG + (O > 0)):
                    for j in T.vectorized(P):
                        acc[j] = acc[j] + prod[g, j]
                for j in T.vectorized(P):
                    if residual:
                        Y[m, n0 + j] = T.Cast("float16", acc[j] + T.Cast("float32", R[m, n0 + j]))
                    else:
                        Y[m, n0 + j] = T.Cast("float16", acc[j])

    return entry_point(body, shape, residual, "w4a4_gemm_cpu" + ("_residual" if residual else ""))


def entry_point(body, shape: W4A4Shape, residual: bool, name: str) -> tvm.tirx.PrimFunc:
    """A W4A4 kernel's PrimFunc (every variant's: the CPU twin's and the CUDA kernels') around its
    body macro ``body(M, A4, AS4, A8, AS8, W4, WS4, W8, WS8, R, Y)``: the eight operands, ``res``
    when built with a residual, and ``y`` (without a residual the body gets ``Y`` as ``R`` and
    never reads it as one)."""
    N = shape.N

    @T.macro
    def matched(a_q4, a_s4, a_q8, a_s8, w_q4, w_s4, w_q8, w_s8, res, y):
        M = T.int32()
        A4, AS4, A8, AS8 = _match_rows(a_q4, a_s4, a_q8, a_s8, M, shape)
        W4, WS4, W8, WS8 = _match_rows(w_q4, w_s4, w_q8, w_s8, N, shape)
        Y = T.match_buffer(y, (M, N), "float16")
        R = T.match_buffer(res, (M, N), "float16") if residual else Y
        body(M, A4, AS4, A8, AS8, W4, WS4, W8, WS8, R, Y)

    if residual:

        @T.prim_func
        def w4a4_residual(a_q4: T.handle, a_s4: T.handle, a_q8: T.handle, a_s8: T.handle,
                          w_q4: T.handle, w_s4: T.handle, w_q8: T.handle, w_s8: T.handle,
                          res: T.handle, y: T.handle):
            matched(a_q4, a_s4, a_q8, a_s8, w_q4, w_s4, w_q8, w_s8, res, y)

        return w4a4_residual.with_attr("global_symbol", name)

    @T.prim_func
    def w4a4(a_q4: T.handle, a_s4: T.handle, a_q8: T.handle, a_s8: T.handle,
             w_q4: T.handle, w_s4: T.handle, w_q8: T.handle, w_s8: T.handle, y: T.handle):
        matched(a_q4, a_s4, a_q8, a_s8, w_q4, w_s4, w_q8, w_s8, y, y)

    return w4a4.with_attr("global_symbol", name)


def _nibble(byte, high):
    """The signed INT4 code in the low (``high == 0``) or high nibble of ``byte``, as int16."""
    bits = T.bitwise_and(T.shift_right(T.Cast("int16", byte), T.Cast("int16", high * 4)), T.int16(15))
    return T.bitwise_xor(bits, T.int16(8)) - T.int16(8)


def _match_rows(q4, s4, q8, s8, rows, shape: W4A4Shape):
    """Buffers of one Atom operand (activation or weight) with ``rows`` rows."""
    return (
        T.match_buffer(q4, (rows, shape.packed), "uint8"),
        T.match_buffer(s4, (rows, shape.groups), "float16"),
        T.match_buffer(q8, (rows, shape.O), "int8"),
        T.match_buffer(s8, (rows, 1), "float16"),
    )
