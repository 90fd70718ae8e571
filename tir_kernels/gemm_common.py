"""The tensor-core kernels behind the CUDA W4A4 variants (hand-written TVMScript).

The tiled kernel, in three configurations (`TILED`), and the decode kernel built from the same
pieces with K split across warps (`w4a4_gemv_prim_func`, `GEMV`). The tiled kernel (mma.sync)::

    grid (ceil(N / BN), ceil(M / BM)), one block of WM x WN warps, warp tile (BM/WM) x (BN/WN)
    K is walked in 32-byte steps (64 INT4 channels, or 32 INT8 outlier channels), G/64 steps
    to a group; the outlier block is taken in pieces of the same size. Per group (or piece):
        wait for its stages, one barrier, cp.async the stages STAGES - G/64 steps ahead
        per step: ldmatrix the packed bytes straight into mma fragments, mma.sync into
                  int32 group sums
        at a group's end (or the outlier block's): acc += f32(isum) * (s_a * s_w); isum = 0
    y = f16(acc (+ residual))

The float work per group is the same as the reference's, in the same order; nvcc contracts
``acc + p * s`` into one FMA, so the kernels equal `w4a4_gemm_reference(..., fused=True)` bit
for bit (and the unfused reference within a float16 ulp except where a sum cancels).

Why packed bytes go to ``ldmatrix`` unchanged: ``ldmatrix`` hands thread ``(g, t)`` (g = lane/4,
t = lane%4) the 32-bit word ``t`` of row ``g`` of an 8-row x 16-byte tile, and that is exactly
the word the ``mma.sync`` A/B fragments want (rows g and g+8, words t and t+4 of the k-slice).
A word of packed INT4 holds 8 consecutive channels, low nibble first, which is the ``.s4``
operand order, so ``sm80_int4`` feeds ``m16n8k64 s4`` with the loaded registers as they are.

Hopper (``sm90_int8``, and ``gemv`` everywhere) widens each packed word ``x`` into two INT8
words: ``(x << 4) & 0xF0F0F0F0`` (the low nibbles) and ``x & 0xF0F0F0F0`` (the high ones). That
is two instructions, but it gives each code times 16, not the code: every INT4 product comes out
256 times too large. The sums stay exact (|isum| <= 256 * 64 * 128 = 2^21) and the factor is
taken out of the activation scale as it is read, ``s_a * 2^-8``; scaling by a power of two
commutes with float rounding, so ``f32(256 isum) * ((s_a 2^-8) * s_w)`` is bit for bit the
reference's ``f32(isum) * (s_a * s_w)``. Low and high nibbles land in different k-slots of the
mma, which is harmless: A and W are permuted the same way and a dot product does not care.

``sm90_wgmma`` (sm_90a) keeps the pipeline and the numerics but hands the tensor work to
``wgmma.mma_async m64n128k32 s8``, one warpgroup per 64 rows of the block. wgmma reads B from
shared memory in its core-matrix layout (8 rows x 16 bytes contiguous), so each block's W tile
is widened once, by the whole block, from the packed stage into a separate buffer (the same
nibble split, low nibbles then high nibbles of each 16-byte chunk as the two k-halves); A still
goes through ldmatrix and the register widening, and feeds wgmma from registers (its fragment
layout per warp is mma.sync's). The next block is prepared (W widened, A loaded, scales
converted to float once per row) into the other half of double buffers while the current
block's wgmmas run, so there is one barrier per group. Its sums are u32 registers read first by
an asm volatile subtraction of the magic, which nvcc keeps after the asm volatile wait.

Shared-memory tiles are rows of 32 bytes (two 16-byte chunks). ``ldmatrix`` reads one chunk of
8 consecutive rows, which would hit the same banks twice; chunk index ``L = 2 row + c`` is stored
at ``L ^ ((L >> 3) & 1)``, so those 8 chunks fill 8 distinct bank groups.

Scales are fp16 ``[rows, groups]``: one per row of a tile, 2 bytes apart from nothing useful,
and cp.async moves 4 bytes at least. Each row's scale travels in the aligned 4-byte word that
holds it (its neighbour, the other half, is dropped), in the same pipeline as the tiles, and
each thread extracts the 16 scales its fragments need when it closes the group. A load into a
register instead would stall every step on a global-memory round trip; float scales converted
once into shared memory would need a second barrier per group.

Rows past M (and columns past N) are never copied: the stale shared memory they leave only
reaches outputs that are not stored. The only read outside the operands is the 2 bytes after
the last scale of an array whose length is odd (the aligned word of its last element), which
stays inside the allocation's granule and is discarded.
"""

from __future__ import annotations

import dataclasses

import tvm
from tvm.script import tirx as T

from atom_tvm.errors import UserError
from tir_kernels.w4a4_gemm import W4A4Shape, entry_point

#: Bytes of one row per pipeline step: 64 INT4 or 32 INT8 channels, two 16-byte chunks.
STEP_BYTES = 32
#: Factor the nibble widening puts on every INT4 product (16 per operand).
WIDEN_FACTOR = 256
#: Start value of the int32 group sums: the bits of 1.5 * 2^23 as float32 (see close_group).
MAGIC = 0x4B400000
MAGIC_FLOAT = 12582912.0


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Block tile, warp grid, pipeline depth and INT4 instruction of one kernel configuration."""

    name: str
    block_m: int
    block_n: int
    warps_m: int
    warps_n: int
    stages: int
    widen: bool  # INT4 -> INT8 in registers and m16n8k32 s8; else native m16n8k64 s4

    @property
    def threads(self) -> int:
        return 32 * self.warps_m * self.warps_n

    @property
    def m_frags(self) -> int:
        """16-row mma tiles per warp."""
        return self.block_m // self.warps_m // 16

    @property
    def n_frags(self) -> int:
        """8-column mma tiles per warp."""
        return self.block_n // self.warps_n // 8

    @property
    def wgmma(self) -> bool:
        """Whether the tensor work is wgmma (`WgmmaConfig`) rather than mma.sync."""
        return False


@dataclasses.dataclass(frozen=True)
class WgmmaConfig(TileConfig):
    """The Hopper (sm_90a) form of the tiled kernel: warpgroups of 4 warps, each warpgroup 64 rows
    of the block by all ``block_n`` columns, one ``wgmma.mma_async m64n<block_n>k32 s8`` per 32
    INT8 channels. Warp ``w`` holds rows 16w .. 16w+15 of its warpgroup's accumulator in the mma.sync
    C layout (``warps_m`` = 4 per warpgroup, ``warps_n`` = 1), so the group epilogue is the mma.sync
    kernel's with one 16-row fragment and ``block_n / 8`` column fragments. A comes from registers
    (ldmatrix, then the nibble widening), W from shared memory, widened there once per block."""

    @property
    def wgmma(self) -> bool:
        return True


#: mma.sync: 128x128 blocks of 8 warps (64x32 each): 64 int32 sums and 64 float accumulators per
#: thread, 4 stages = 32 KiB of tiles, under the 48 KiB of static shared memory every arch has.
#: wgmma: 128x128 blocks of 2 warpgroups (64x128 each, the same 64 + 64 registers), 8 stages (a
#: ring of 4 groups at G = 128) in 106 KiB of dynamic shared memory. On the H200 it beat 64-row
#: blocks of one warpgroup (two blocks per SM, but each widens a whole W tile for half the work)
#: by 13-21 %, and those with 12 stages by 44-65 %.
TILED = {
    "sm90_wgmma": WgmmaConfig("sm90_wgmma", 128, 128, 8, 1, 8, widen=True),
    "sm90_int8": TileConfig("sm90_int8", 128, 128, 2, 4, 4, widen=True),
    "sm80_int4": TileConfig("sm80_int4", 128, 128, 2, 4, 4, widen=False),
}
#: sm_90a, M up to a few hundred rows: 64x64 blocks of one warpgroup. There 128x128 blocks are too
#: few to fill the SMs (32 for N = 4096), and these ran up to 2x faster on an H100 (at M = 128:
#: 23.7 against 47.7 us on 4096x4096, 57.3 against 117.0 on Llama-2-7B down; docs/bench/gemm.md).
WGMMA_64 = WgmmaConfig("sm90_wgmma_64", 64, 64, 4, 1, 8, widen=True)
#: sm_90a, M <= 64 on very wide weights (N > 264 x 64, e.g. a fused gate/up), where 64x64 blocks
#: would be too many: 64x128 blocks of one warpgroup, which skip the 128-row tile's idle half
#: (13B gate/up, N = 27648, M = 32 and 64: 61.2 and 68.6 against 91.9 and 97.9 us on an H100).
WGMMA_64x128 = WgmmaConfig("sm90_wgmma_64x128", 64, 128, 4, 1, 8, widen=True)


def check_cuda_shape(shape: W4A4Shape) -> None:
    """The CUDA kernels take the outlier block in pieces as long as one group's bytes (G/2)."""
    if shape.O % (shape.G // 2):
        raise UserError(
            f"the CUDA W4A4 kernels need O to be a multiple of G/2 = {shape.G // 2}, got O = {shape.O}; "
            "use 128")
    if shape.K == 0:
        raise UserError("K = 0: nothing to multiply")


def _lo_nibbles(x):
    """The 4 low nibbles of a packed word as INT8 codes times 16."""
    return T.bitwise_and(T.shift_left(x, T.uint32(4)), T.uint32(0xF0F0F0F0))


def _hi_nibbles(x):
    """The 4 high nibbles of a packed word as INT8 codes times 16."""
    return T.bitwise_and(x, T.uint32(0xF0F0F0F0))


def _swizzle(row, chunk):
    """Byte offset of 16-byte chunk ``chunk`` of tile row ``row`` (see the module docstring)."""
    linear = row * 2 + chunk
    return T.bitwise_xor(linear, T.bitwise_and(T.shift_right(linear, 3), 1)) * 16


def _scale_index(int4, group, row, groups):
    """Flat index of ``row``'s scale: in the fp16 s4 [rows, groups] for INT4 group ``group``
    (``int4`` true), else in the outlier scales s8 [rows, 1]."""
    return T.Select(int4, row * groups + group, row)


@T.macro
def _copy_scale_word(dst, s4, s8, int4, group, row, groups):
    """cp.async the 4 bytes at the even index at or below the scale `_scale_index` names
    (cp.async moves 4 bytes at least; the word's other half is a neighbour, dropped when read)."""
    even = _scale_index(int4, group, row, groups) // 2 * 2
    if int4:
        T.evaluate(T.ptx["cp.async.ca.shared.global"](dst, s4.ptr_to([even // groups, even % groups]), 4))
    else:
        T.evaluate(T.ptx["cp.async.ca.shared.global"](dst, s8.ptr_to([even, 0]), 4))


def _copy16_unless(dst, src, skip):
    """cp.async 16 bytes from ``src`` to ``dst``, or zeros without reading ``src`` where ``skip``."""
    return T.ptx["cp.async.cg.shared.global"](dst, src, 16, T.ptx.pred(skip))


def _staged_scale(word, index):
    """float32 of the fp16 scale with flat index ``index`` in its staged aligned word."""
    shift = T.Cast("uint32", index % 2 * 16)
    bits = T.Cast("uint16", T.bitwise_and(T.shift_right(word, shift), T.uint32(0xFFFF)))
    return T.Cast("float32", T.reinterpret("float16", bits))


def _ldmatrix(frag, index, count, tile, offset):
    """ldmatrix.x``count`` of the 16-byte rows the lanes address at ``offset`` into ``frag[index:]``."""
    return T.ptx_legacy.ldmatrix(False, count, ".b16", frag.data, index, tile.data, offset, dtype="uint8")


def _mma(shape_name, dtype, a, a_index, b, b_index, c, c_index, acc_dtype="int32"):
    """One mma.sync ``shape_name`` row.col of ``dtype`` operands into ``acc_dtype`` ``c[c_index:]``
    (PTX names: "int8"/"int4" into "int32", "fp16" into "fp32")."""
    buffer_dtype = "float32" if acc_dtype == "fp32" else acc_dtype
    return T.ptx_legacy.mma(shape_name, "row", "col", dtype, dtype, acc_dtype, a.data, a_index, b.data, b_index,
                            c.data, c_index, False, dtype=buffer_dtype)


def fragment_loader(cfg: TileConfig):
    """The macro ``load_fragments(slot, lane, warp_m, warp_n, tile_a, tile_w, frag_a, frag_w)`` of a
    tiled kernel with configuration ``cfg``: stage ``slot`` of the swizzled 32-byte-row tiles into
    the warp's mma fragments, ldmatrix.x4 per 16-row A tile and per pair of 8-row W tiles (x2 for
    an odd one). A factory, so that every tiled kernel (W4A4 and the dense ones) loads the same way."""
    BM, BN, MI, NI = cfg.block_m, cfg.block_n, cfg.m_frags, cfg.n_frags

    @T.macro
    def load_fragments(slot, lane, warp_m, warp_n, tile_a, tile_w, frag_a, frag_w):
        for mi in T.unroll(MI):
            row = warp_m + mi * 16 + lane % 16
            src = slot * BM * STEP_BYTES + _swizzle(row, lane // 16)
            T.evaluate(_ldmatrix(frag_a, mi * 4, 4, tile_a, src))
        for p in T.unroll(NI // 2):
            row = warp_n + (2 * p + lane // 16) * 8 + lane % 8
            src = slot * BN * STEP_BYTES + _swizzle(row, lane // 8 % 2)
            T.evaluate(_ldmatrix(frag_w, p * 4, 4, tile_w, src))
        if NI % 2 == 1:
            row = warp_n + (NI - 1) * 8 + lane % 8
            src = slot * BN * STEP_BYTES + _swizzle(row, lane // 8 % 2)
            T.evaluate(_ldmatrix(frag_w, (NI - 1) * 2, 2, tile_w, src))

    return load_fragments


def w4a4_cuda_prim_func(shape: W4A4Shape, residual: bool, cfg: TileConfig) -> tvm.tirx.PrimFunc:
    """The W4A4 GEMM of `tir_kernels.w4a4_gemm` as one CUDA kernel with configuration ``cfg``."""
    return entry_point(_tiled_body(shape, residual, cfg), shape, residual, kernel_name(cfg, residual))


def w4a4_linear_prim_func(shape: W4A4Shape, residual: bool, tiers) -> tvm.tirx.PrimFunc:
    """Several kernels in one PrimFunc, chosen at run time by M: ``tiers`` is ``((max_m, config),
    ..., (None, config))``, each config (`GemvConfig` or `TileConfig`) running for M above the
    previous one's ``max_m`` and up to its own, the last for any larger M. For graphs whose M is
    only known at run time (batched decode: M is the batch), which would otherwise run one kernel
    for every M. Named after the last (the largest-M) config."""
    bodies = [(lambda M, max_m=max_m: M <= max_m,
               _gemv_body(shape, residual, cfg) if isinstance(cfg, GemvConfig) else _tiled_body(shape, residual, cfg))
              for max_m, cfg in tiers]
    return entry_point(by_rows(bodies), shape, residual, kernel_name(tiers[-1][1], residual, "linear"))


def by_rows(tiers):
    """The body macro ``(M, *operands)`` that runs the first body of ``tiers`` (``(test, body)``
    pairs) whose ``test(M)`` holds, and the last one's otherwise (its test is not asked): several
    kernels in one PrimFunc, chosen at run time by the row count M (a GEMM's rows, the KV
    append's tokens)."""
    (test, first), rest = tiers[0], tiers[1:]
    if not rest:
        return first
    others = by_rows(rest)

    @T.macro
    def choose(M, *operands):
        if test(M):
            first(M, *operands)
        else:
            others(M, *operands)

    return choose


def _tiled_body(shape: W4A4Shape, residual: bool, cfg: TileConfig):
    """The tiled kernel's body macro (see `w4a4_gemm.entry_point`)."""
    check_cuda_shape(shape)
    N, O, G = shape.N, shape.O, shape.G
    BM, BN, S, THREADS = cfg.block_m, cfg.block_n, cfg.stages, cfg.threads
    WN, MI, NI = cfg.warps_n, cfg.m_frags, cfg.n_frags
    TM, TN = BM // cfg.warps_m, BN // WN
    STEPS_PER_GROUP = G // 64
    NORMAL_STEPS = shape.normal // 64
    OUTLIER_STEPS = O // STEP_BYTES
    STEPS = NORMAL_STEPS + OUTLIER_STEPS
    # Steps are taken in blocks of one group (G/64 steps), with one barrier per block; the
    # outlier block is cut into blocks of the same size (check_cuda_shape).
    SPB = STEPS_PER_GROUP
    BLOCKS = STEPS // SPB
    BLOCKS_IN_FLIGHT = S // SPB - 1
    CHUNK_ROUNDS = -(-2 * (BM + BN) // THREADS)
    SCALE_ROUNDS = -(-(BM + BN) // THREADS)
    GROUPS = max(shape.groups, 1)  # a divisor only; K == O has no INT4 groups
    A_SCALE = 1.0 / WIDEN_FACTOR if cfg.widen else 1.0
    ACC = MI * NI * 4
    OUTLIER_MAGIC = 128 * 128 * O <= 1 << 22
    int4_mma = ("m16n8k32", "int8") if cfg.widen else ("m16n8k64", "int4")
    ISUM = "uint32" if cfg.wgmma else "int32"  # wgmma's accumulators are u32 registers

    # Step helpers, expanded inside `body`; they take its thread index, tiles and registers.
    @T.macro
    def copy_chunk(tile, offset, q4, q8, row, step, half):
        """cp.async 16 bytes: chunk `half` of `row`'s bytes of `step` (INT4 or outlier part)."""
        dst = tile.ptr_to([offset])
        if step < NORMAL_STEPS:
            src = q4.ptr_to([row, step * STEP_BYTES + half * 16])
            T.evaluate(T.ptx["cp.async.cg.shared.global"](dst, src, 16))
        else:
            src = q8.ptr_to([row, (step - NORMAL_STEPS) * STEP_BYTES + half * 16])
            T.evaluate(T.ptx["cp.async.cg.shared.global"](dst, src, 16))

    @T.macro
    def copy_step(step, slot, tx, m0, n0, M, A4, A8, W4, W8, tile_a, tile_w):
        """The A and W bytes of `step` into stage `slot`, one 16-byte chunk per thread and round.
        Rows past the matrix are not copied: their stale bytes only reach outputs that are never
        stored (an output row depends on its own A row alone, a column on its own W row)."""
        for r in T.unroll(CHUNK_ROUNDS):
            chunk = tx + r * THREADS
            if chunk < 2 * BM:
                if m0 + chunk // 2 < M:
                    offset = slot * BM * STEP_BYTES + _swizzle(chunk // 2, chunk % 2)
                    copy_chunk(tile_a, offset, A4, A8, m0 + chunk // 2, step, chunk % 2)
            elif chunk < 2 * (BM + BN):
                if n0 + chunk // 2 - BM < N:
                    offset = slot * BN * STEP_BYTES + _swizzle(chunk // 2 - BM, chunk % 2)
                    copy_chunk(tile_w, offset, W4, W8, n0 + chunk // 2 - BM, step, chunk % 2)

    def closes_group(step):
        """Whether `step` is the last of its INT4 group, or the last outlier step."""
        return T.Or(T.And(step < NORMAL_STEPS, (step + 1) % STEPS_PER_GROUP == 0), step == STEPS - 1)

    def scale_index(step, row):
        """Flat index of `step`'s scale of `row` in the fp16 s4 [rows, groups] or s8 [rows, 1]."""
        return _scale_index(step < NORMAL_STEPS, step // STEPS_PER_GROUP, row, GROUPS)

    @T.macro
    def copy_scale_word(dst, s4, s8, row, step):
        _copy_scale_word(dst, s4, s8, step < NORMAL_STEPS, step // STEPS_PER_GROUP, row, GROUPS)

    @T.macro
    def copy_scales(step, slot, tx, m0, n0, M, AS4, AS8, WS4, WS8, scale_words):
        """cp.async the aligned 4-byte word holding each row's scale for `step` (cp.async moves
        4 bytes at least; the word's other half is a neighbouring scale, dropped when read)."""
        if closes_group(step):
            for r in T.unroll(SCALE_ROUNDS):
                i = tx + r * THREADS
                dst = scale_words.ptr_to([slot * (BM + BN) + i])
                if i < BM:
                    if m0 + i < M:
                        copy_scale_word(dst, AS4, AS8, m0 + i, step)
                elif i < BM + BN:
                    if n0 + i - BM < N:
                        copy_scale_word(dst, WS4, WS8, n0 + i - BM, step)

    load_fragments = fragment_loader(cfg)

    @T.macro
    def mma_all(shape_name, dtype, a, b, isum):
        for mi, ni in T.grid(MI, NI):
            T.evaluate(_mma(shape_name, dtype, a, mi * 4, b, ni * 2, isum, (mi * NI + ni) * 4))

    @T.macro
    def int4_step(frag_a, frag_w, wide_a, wide_w, isum):
        if cfg.widen:
            # Chunk h of the packed rows: rows g / g+8 are frag_a[4mi + 2h], [4mi + 2h + 1].
            for h in T.unroll(2):
                for mi in T.unroll(MI):
                    for e in T.unroll(2):
                        wide_a[mi * 4 + e] = _lo_nibbles(frag_a[mi * 4 + 2 * h + e])
                        wide_a[mi * 4 + 2 + e] = _hi_nibbles(frag_a[mi * 4 + 2 * h + e])
                for ni in T.unroll(NI):
                    wide_w[ni * 2] = _lo_nibbles(frag_w[ni * 2 + h])
                    wide_w[ni * 2 + 1] = _hi_nibbles(frag_w[ni * 2 + h])
                mma_all("m16n8k32", "int8", wide_a, wide_w, isum)
        else:
            mma_all(int4_mma[0], int4_mma[1], frag_a, frag_w, isum)

    def staged_scale(word, step, row):
        """float32 of the fp16 scale of `row` in its staged aligned word (low half = even index)."""
        return _staged_scale(word, scale_index(step, row))

    @T.macro
    def close_group(step, exact_as_magic, lane, m0, n0, warp_m, warp_n, scale_words, row_scale,
                    col_scale, isum, acc):
        """acc += f32(isum) * (s_a * s_w) for this thread's fragment elements, then restart isum.

        The scales come straight from the words staged for `step` (its last step), which this
        step's barrier made visible: no extra barrier. The sums start at MAGIC, so a finished one
        read as float32 is 1.5 * 2^23 + isum exactly (|isum| <= 2^22): one FADD converts it,
        where I2F runs at a quarter of the FP32 rate. Larger sums (over 256 outliers) use I2F.
        """
        base = step % S * (BM + BN)
        for mi, h in T.grid(MI, 2):
            row = warp_m + mi * 16 + lane // 4 + h * 8
            value = staged_scale(scale_words[base + row], step, m0 + row)
            row_scale[mi * 2 + h] = T.Select(step < NORMAL_STEPS, value * T.float32(A_SCALE), value)
        for ni, e in T.grid(NI, 2):
            col = warp_n + ni * 8 + lane % 4 * 2 + e
            col_scale[ni * 2 + e] = staged_scale(scale_words[base + BM + col], step, n0 + col)
        for mi, ni, e in T.grid(MI, NI, 4):
            i = (mi * NI + ni) * 4 + e
            s = row_scale[mi * 2 + e // 2] * col_scale[ni * 2 + e % 2]
            if exact_as_magic:
                value = T.reinterpret("float32", isum[i]) - T.float32(MAGIC_FLOAT)
            else:
                value = T.Cast("float32", isum[i] - MAGIC)
            acc[i] = acc[i] + value * s
            isum[i] = MAGIC

    @T.macro
    def copy_block(block, copy_args, scale_args):
        """Issue the copies of step block `block` (one group, or a group's worth of outliers)."""
        for h in T.unroll(SPB):
            copy_step(block * SPB + h, (block * SPB + h) % S, *copy_args)
            copy_scales(block * SPB + h, (block * SPB + h) % S, *scale_args)

    @T.macro
    def begin_block(block, copy_args, scale_args):
        """Wait for `block`'s stages (one barrier per block), then refill the stages that the
        block before it used with block + BLOCKS_IN_FLIGHT."""
        T.evaluate(T.ptx["cp.async.wait_group"](BLOCKS_IN_FLIGHT - 1))
        T.tvm_storage_sync("shared")
        if block + BLOCKS_IN_FLIGHT < BLOCKS:
            copy_block(block + BLOCKS_IN_FLIGHT, copy_args, scale_args)
        T.evaluate(T.ptx["cp.async.commit_group"]())

    # wgmma (sm_90a). Step blocks (one group, or a group's worth of outliers) go through a ring
    # of RING blocks; per block, one barrier. Block b+1 is *prepared* while block b's wgmmas run:
    # its W widened into the core-matrix layout wgmma reads, its A fragments loaded and widened
    # into registers, its scales converted to float, each into the half (`par`ity) of a double
    # buffer that block b does not use; the barrier at the top of block b+1 publishes all that.
    RING = S // SPB
    WIDE_SLICE = BN * STEP_BYTES // 4  # uint32 words of one k32 slice of widened W
    WIDE_HALF = SPB * 2 * WIDE_SLICE  # words of one block's widened W
    A_REGS = SPB * 8  # widened A registers of one block (two k32 slices per step)
    # Byte offsets in the one dynamic allocation. The scale words go last: TVM sizes the allocation
    # by the highest index it sees read or written, and the widened W and float scales are only
    # touched through asm loads and stores and wgmma descriptors, whose extent it cannot see.
    TILE_W_AT = S * BM * STEP_BYTES
    WIDE_AT = TILE_W_AT + S * BN * STEP_BYTES
    FSCALE_AT = WIDE_AT + 2 * WIDE_HALF * 4
    SCALES_AT = FSCALE_AT + 2 * (BM + BN) * 4
    SMEM_BYTES = SCALES_AT + S * (BM + BN) * 4
    WIDEN_ROUNDS = 2 * BN // THREADS
    WGMMA = f"wgmma.mma_async.sync.aligned.m64n{BN}k32.s32.s8.s8"
    # Each thread copies the same rows' chunks every step (whole rounds of A rows, then of W rows):
    # their addresses are worked out once, and rows past M or N read nothing (ignore-src).
    COPY_ROUNDS = 2 * (BM + BN) // THREADS
    A_ROUNDS = 2 * BM // THREADS
    if cfg.wgmma and (2 * BM % THREADS or 2 * BN % THREADS or S % SPB or RING < 2):
        raise ValueError(f"{cfg.name}: 2 x block_m and 2 x block_n must be multiples of {THREADS} threads "
                         f"and the {S} stages whole blocks of {SPB} steps, two or more")

    @T.macro
    def plan_copies(tx, m0, n0, M, copy_src, copy_dst, copy_skip):
        """Per copy round: the row's element offset in the packed INT4 array ([0]) and in the
        outliers ([1]) at step 0, its swizzled byte offset in a stage, and whether it is past the
        matrix (then clamped to the last row, whose address is never read)."""
        for r in T.unroll(COPY_ROUNDS):
            chunk = tx + r * THREADS
            half = chunk % 2
            tile_row = T.Select(r < A_ROUNDS, chunk // 2, chunk // 2 - BM)
            row = T.Select(r < A_ROUNDS, m0, n0) + tile_row
            rows = T.Select(r < A_ROUNDS, M, N)
            copy_skip[r] = T.Cast("int32", row >= rows)
            copy_dst[r] = _swizzle(tile_row, half)
            copy_src[r * 2] = T.min(row, rows - 1) * shape.packed + half * 16
            copy_src[r * 2 + 1] = T.min(row, rows - 1) * O + half * 16

    @T.macro
    def copy_planned(block, int4, copy_src, copy_dst, copy_skip, A4, A8, W4, W8, tile_a, tile_w, scale_args):
        """`copy_block` with the planned addresses, for a block known to be INT4 (`int4`) or not."""
        for h in T.unroll(SPB):
            step = block * SPB + h
            slot = step % S
            for r in T.unroll(COPY_ROUNDS):
                a_dst = tile_a.ptr_to([slot * BM * STEP_BYTES + copy_dst[r]])
                w_dst = tile_w.ptr_to([(slot * BN * STEP_BYTES + copy_dst[r]) // 4])
                src4 = copy_src[r * 2] + step * STEP_BYTES
                src8 = copy_src[r * 2 + 1] + (step - NORMAL_STEPS) * STEP_BYTES
                if r < A_ROUNDS:
                    if int4:
                        T.evaluate(_copy16_unless(a_dst, A4.ptr_to([0, src4]), copy_skip[r]))
                    else:
                        T.evaluate(_copy16_unless(a_dst, A8.ptr_to([0, src8]), copy_skip[r]))
                else:
                    if int4:
                        T.evaluate(_copy16_unless(w_dst, W4.ptr_to([0, src4]), copy_skip[r]))
                    else:
                        T.evaluate(_copy16_unless(w_dst, W8.ptr_to([0, src8]), copy_skip[r]))
            copy_scales(step, slot, *scale_args)

    @T.macro
    def copy_any(block, planned):
        """`copy_planned` of `block`, INT4 or outlier as it falls (two branches, each static)."""
        if block < shape.groups:
            copy_planned(block, True, *planned)
        elif block < BLOCKS:
            copy_planned(block, False, *planned)

    @T.macro
    def wgmma_slice(par, slice_index, areg, a_index, wide, desc, isum):
        """isum += A (registers areg[a_index:a_index+4]) x k32 slice `slice_index` of `wide` half
        `par`. Slices are in the no-swizzle K-major core-matrix layout: an 8-row x 16-byte core
        matrix is 128 contiguous bytes, the two k-halves of 8 rows are 128 bytes apart (leading
        byte offset), consecutive 8-row groups 256 bytes (stride byte offset); the descriptor
        counts in 16 bytes."""
        T.evaluate(T.cuda.wgmma.encode_matrix_descriptor(
            desc.ptr_to([0]), wide.ptr_to([par * WIDE_HALF + slice_index * WIDE_SLICE]), 8, 16, 0))
        T.evaluate(T.ptx[WGMMA](*[isum[i] for i in range(ACC)], areg[a_index], areg[a_index + 1],
                                areg[a_index + 2], areg[a_index + 3], desc[0], True))

    @T.macro
    def prepare(block, par, tx, lane, m0, n0, warp_m, tile_a, tile_w, wide, fscale, scale_words,
                packed, frag_a, areg):
        """Block `block`'s operands into double-buffer half `par` (its stages have landed and a
        barrier has passed): W widened by the whole block, 16 bytes per thread and round, with
        asm loads and stores (TVM would fence plain ones against each other: one allocation);
        A fragments by ldmatrix, widened in registers; the float scales of its closing step, one
        row per thread. The fence orders these generic-proxy writes before wgmma's reads."""
        for h in T.unroll(SPB):
            slot = (block * SPB + h) % S
            for r in T.unroll(WIDEN_ROUNDS):
                row = (tx + r * THREADS) % BN
                chunk = (tx + r * THREADS) // BN
                src = (slot * BN * STEP_BYTES + _swizzle(row, chunk)) // 4
                T.evaluate(T.ptx["ld.shared.v4.u32"](*[packed[v] for v in range(4)], tile_w.ptr_to([src])))
                core = par * WIDE_HALF + (row // 8 * 256 + row % 8 * 16) // 4
                if block < shape.groups:
                    dst = core + (h * 2 + chunk) * WIDE_SLICE
                    T.evaluate(T.ptx["st.shared.v4.u32"](wide.ptr_to([dst]),
                                                         *[_lo_nibbles(packed[v]) for v in range(4)]))
                    T.evaluate(T.ptx["st.shared.v4.u32"](wide.ptr_to([dst + 32]),
                                                         *[_hi_nibbles(packed[v]) for v in range(4)]))
                else:
                    dst = core + h * 2 * WIDE_SLICE + chunk * 32
                    T.evaluate(T.ptx["st.shared.v4.u32"](wide.ptr_to([dst]), *[packed[v] for v in range(4)]))
            row = warp_m + lane % 16
            T.evaluate(_ldmatrix(frag_a, h * 4, 4, tile_a, slot * BM * STEP_BYTES + _swizzle(row, lane // 16)))
            # Chunk c of the packed rows: rows g / g+8 are frag_a[4h + 2c], [4h + 2c + 1].
            for c, e in T.grid(2, 2):
                i = par * A_REGS + (h * 2 + c) * 4 + e
                if block < shape.groups:
                    areg[i] = _lo_nibbles(frag_a[h * 4 + 2 * c + e])
                    areg[i + 2] = _hi_nibbles(frag_a[h * 4 + 2 * c + e])
                elif c == 0:
                    areg[i] = frag_a[h * 4 + e]
                    areg[i + 2] = frag_a[h * 4 + 2 + e]
        step = block * SPB + SPB - 1
        for r in T.unroll(SCALE_ROUNDS):
            i = tx + r * THREADS
            if i < BM + BN:
                word = scale_words[step % S * (BM + BN) + i]
                if i < BM:
                    value = staged_scale(word, step, m0 + i)
                    value = T.Select(step < NORMAL_STEPS, value * T.float32(A_SCALE), value)
                    T.evaluate(T.ptx["st.shared.f32"](fscale.ptr_to([par * (BM + BN) + i]), value))
                else:
                    value = staged_scale(word, step, n0 + i - BM)
                    T.evaluate(T.ptx["st.shared.f32"](fscale.ptr_to([par * (BM + BN) + i]), value))
        T.evaluate(T.ptx["fence.proxy.async.shared::cta"]())

    @T.macro
    def issue(block, par, wide, desc, areg, isum):
        """Block `block`'s wgmmas (prepared in half `par`), committed as one group, not waited for."""
        T.evaluate(T.ptx["wgmma.fence.sync.aligned"]())
        if block < shape.groups:
            for h, c in T.grid(SPB, 2):
                wgmma_slice(par, h * 2 + c, areg, par * A_REGS + (h * 2 + c) * 4, wide, desc, isum)
        else:
            for h in T.unroll(SPB):
                wgmma_slice(par, h * 2, areg, par * A_REGS + h * 2 * 4, wide, desc, isum)
        T.evaluate(T.ptx["wgmma.commit_group.sync.aligned"]())

    @T.macro
    def wgmma_close(par, exact_as_magic, lane, warp_m, fscale, row_scale, col_scale, isum, acc, fsum, esum):
        """acc += f32(isum) * (s_a * s_w) with the float scales of half `par`, then restart isum
        (see close_group). The sums' first reader is an asm volatile, which nvcc keeps after the
        asm volatile wgmma.wait_group (a plain FADD it could hoist above the wait)."""
        for h in T.unroll(2):
            row = warp_m + lane // 4 + h * 8
            T.evaluate(T.ptx["ld.shared.f32"](row_scale[h], fscale.ptr_to([par * (BM + BN) + row])))
        for ni in T.unroll(NI):
            T.evaluate(T.ptx["ld.shared.v2.f32"](col_scale[ni * 2], col_scale[ni * 2 + 1],
                                                 fscale.ptr_to([par * (BM + BN) + BM + ni * 8 + lane % 4 * 2])))
        for ni, e in T.grid(NI, 4):
            i = ni * 4 + e
            s = row_scale[e // 2] * col_scale[ni * 2 + e % 2]
            if exact_as_magic:
                T.evaluate(T.ptx["sub.f32"](fsum[0], T.reinterpret("float32", isum[i]), T.float32(MAGIC_FLOAT)))
            else:
                T.evaluate(T.ptx["sub.s32"](esum[0], T.reinterpret("int32", isum[i]), T.int32(MAGIC)))
                fsum[0] = T.Cast("float32", esum[0])
            acc[i] = acc[i] + fsum[0] * s
            isum[i] = T.uint32(MAGIC)

    @T.macro
    def body(M, A4, AS4, A8, AS8, W4, WS4, W8, WS8, R, Y):
        bx = T.launch_thread("blockIdx.x", -(-N // BN))
        by = T.launch_thread("blockIdx.y", T.ceildiv(M, BM))
        tx = T.launch_thread("threadIdx.x", THREADS)
        if cfg.wgmma:
            # One dynamic allocation carved by hand: TVM's pass that merges several cannot follow
            # shared loads outside stores (the cp.async addresses, the scale words' lets).
            w4a4_smem = T.alloc_buffer((SMEM_BYTES,), "uint8", scope="shared.dyn")
            tile_a = T.decl_buffer((S * BM * STEP_BYTES,), "uint8", data=w4a4_smem.data, scope="shared.dyn")
            tile_w = T.decl_buffer((S * BN * STEP_BYTES // 4,), "uint32", data=w4a4_smem.data,
                                   elem_offset=TILE_W_AT // 4, scope="shared.dyn")
            wide = T.decl_buffer((2 * WIDE_HALF,), "uint32", data=w4a4_smem.data, elem_offset=WIDE_AT // 4,
                                 scope="shared.dyn")
            fscale = T.decl_buffer((2 * (BM + BN),), "float32", data=w4a4_smem.data, elem_offset=FSCALE_AT // 4,
                                   scope="shared.dyn")
            scale_words = T.decl_buffer((S * (BM + BN),), "uint32", data=w4a4_smem.data,
                                        elem_offset=SCALES_AT // 4, scope="shared.dyn")
            packed = T.alloc_buffer((4,), "uint32", scope="local")
            desc = T.alloc_buffer((1,), "uint64", scope="local")
            fsum = T.alloc_buffer((1,), "float32", scope="local")
            esum = T.alloc_buffer((1,), "int32", scope="local")
            areg = T.alloc_buffer((2 * A_REGS,), "uint32", scope="local")
            copy_src = T.alloc_buffer((2 * COPY_ROUNDS,), "int32", scope="local")
            copy_dst = T.alloc_buffer((COPY_ROUNDS,), "int32", scope="local")
            copy_skip = T.alloc_buffer((COPY_ROUNDS,), "int32", scope="local")
        else:
            tile_a = T.alloc_buffer((S * BM * STEP_BYTES,), "uint8", scope="shared")
            tile_w = T.alloc_buffer((S * BN * STEP_BYTES,), "uint8", scope="shared")
            scale_words = T.alloc_buffer((S * (BM + BN),), "uint32", scope="shared")
        row_scale = T.alloc_buffer((MI * 2,), "float32", scope="local")
        col_scale = T.alloc_buffer((NI * 2,), "float32", scope="local")
        frag_a = T.alloc_buffer((SPB * 4 if cfg.wgmma else MI * 4,), "uint32", scope="local")
        frag_w = T.alloc_buffer((NI * 2,), "uint32", scope="local")
        wide_a = T.alloc_buffer((MI * 4,), "uint32", scope="local")
        wide_w = T.alloc_buffer((NI * 2,), "uint32", scope="local")
        isum = T.alloc_buffer((ACC,), ISUM, scope="local")
        acc = T.alloc_buffer((ACC,), "float32", scope="local")

        m0 = by * BM
        n0 = bx * BN
        lane = tx % 32
        warp_m = tx // 32 // WN * TM
        warp_n = tx // 32 % WN * TN
        copy_args = (tx, m0, n0, M, A4, A8, W4, W8, tile_a, tile_w)
        scale_args = (tx, m0, n0, M, AS4, AS8, WS4, WS8, scale_words)
        close_args = (lane, m0, n0, warp_m, warp_n, scale_words, row_scale, col_scale, isum, acc)
        fragment_args = (lane, warp_m, warp_n, tile_a, tile_w, frag_a, frag_w)

        for i in T.unroll(ACC):
            isum[i] = T.Cast(ISUM, MAGIC)
            acc[i] = T.float32(0)
        if cfg.wgmma:
            prepare_args = (tx, lane, m0, n0, warp_m, tile_a, tile_w, wide, fscale, scale_words, packed,
                            frag_a, areg)
            wgmma_close_args = (lane, warp_m, fscale, row_scale, col_scale, isum, acc, fsum, esum)
            planned = (copy_src, copy_dst, copy_skip, A4, A8, W4, W8, tile_a, tile_w, scale_args)
            plan_copies(tx, m0, n0, M, copy_src, copy_dst, copy_skip)
            for block in T.unroll(RING):
                copy_any(block, planned)
                T.evaluate(T.ptx["cp.async.commit_group"]())
            T.evaluate(T.ptx["cp.async.wait_group"](RING - 1))
            T.tvm_storage_sync("shared")
            prepare(0, 0, *prepare_args)
            # Unrolled by two so that each block's double-buffer half is a constant (registers).
            for pair in T.serial((BLOCKS + 1) // 2):
                for par in T.unroll(2):
                    block = pair * 2 + par
                    if block < BLOCKS:
                        # Block + 1's stages land; the barrier publishes them and block's preparation.
                        T.evaluate(T.ptx["cp.async.wait_group"](RING - 2))
                        T.tvm_storage_sync("shared")
                        issue(block, par, wide, desc, areg, isum)
                        # Block's stages were last read by its preparation, before the barrier.
                        copy_any(block + RING, planned)
                        T.evaluate(T.ptx["cp.async.commit_group"]())
                        if block + 1 < BLOCKS:
                            prepare(block + 1, 1 - par, *prepare_args)
                        T.evaluate(T.ptx["wgmma.wait_group.sync.aligned"](0))
                        if block < shape.groups:
                            wgmma_close(par, True, *wgmma_close_args)
                        elif block == BLOCKS - 1:
                            wgmma_close(par, OUTLIER_MAGIC, *wgmma_close_args)
        else:
            for block in T.unroll(BLOCKS_IN_FLIGHT):
                if block < BLOCKS:
                    copy_block(block, copy_args, scale_args)
                T.evaluate(T.ptx["cp.async.commit_group"]())

            # Groups and the outlier block as loops of their own, one barrier per group: a group's
            # steps are one straight run of code, so nvcc can load the next step's fragments
            # while the tensor cores work on this one.
            for group in T.serial(shape.groups):
                begin_block(group, copy_args, scale_args)
                for h in T.unroll(SPB):
                    load_fragments((group * SPB + h) % S, *fragment_args)
                    int4_step(frag_a, frag_w, wide_a, wide_w, isum)
                close_group(group * SPB + SPB - 1, True, *close_args)
            for block in T.serial(shape.groups, BLOCKS):
                begin_block(block, copy_args, scale_args)
                for h in T.unroll(SPB):
                    load_fragments((block * SPB + h) % S, *fragment_args)
                    mma_all("m16n8k32", "int8", frag_a, frag_w, isum)
            if OUTLIER_STEPS > 0:
                close_group(STEPS - 1, OUTLIER_MAGIC, *close_args)

        for mi, ni, h in T.grid(MI, NI, 2):
            row = m0 + warp_m + mi * 16 + lane // 4 + h * 8
            col = n0 + warp_n + ni * 8 + lane % 4 * 2
            if row < M and col < N:
                for e in T.unroll(2):
                    value = acc[(mi * NI + ni) * 4 + h * 2 + e]
                    if residual:
                        Y[row, col + e] = T.Cast("float16", value + T.Cast("float32", R[row, col + e]))
                    else:
                        Y[row, col + e] = T.Cast("float16", value)

    return body


def kernel_name(cfg, residual: bool, kind: str = "") -> str:
    """``w4a4_[<kind>_]<config>[_residual]``: the PrimFunc's global symbol (and its CUDA kernels'
    prefix); `w4a4_linear_prim_func`'s carry ``kind`` "linear" and the tiled configuration's name."""
    return "_".join(["w4a4", *([kind] if kind else []), cfg.name]) + ("_residual" if residual else "")


# ---------------------------------------------------------------------------------------------
# Decode: the register-streaming GEMV
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    """The decode kernel: blocks of 16 output columns whose ``k_warps`` warps split K, each taking
    ``unroll`` pieces per round (see `w4a4_gemv_prim_func`)."""

    name: str
    k_warps: int
    unroll: int

    @property
    def threads(self) -> int:
        return 32 * self.k_warps

    @property
    def round_pieces(self) -> int:
        """Pieces a block takes per round (per barrier)."""
        return self.k_warps * self.unroll


#: Output columns of a gemv block: the 16 rows of mma.sync's A operand.
GEMV_BLOCK_N = 16
#: Row stride (int32 words) of a piece's published 16 x 16 sums: 20 makes the lanes' stores of a
#: C fragment (rows 2t, 2t+1 (+8), columns g (+8)) hit 32 distinct banks.
GEMV_SUM_STRIDE = 20
#: 8 warps x 2 pieces per round (16 pieces, 40 KiB of round buffers; 120 registers, so two blocks
#: of 256 threads per SM): on the H200 the best of 4x4, 8x2, 4x2, 8x1 at M = 1 and 16, and of the
#: deeper register rings tried after it (docs/bench/gemm.md).
GEMV = GemvConfig("gemv", 8, 2)


def w4a4_gemv_prim_func(shape: W4A4Shape, residual: bool, cfg: GemvConfig = GEMV) -> tvm.tirx.PrimFunc:
    """The decode kernel (`_gemv_body`) as its own PrimFunc."""
    return entry_point(_gemv_body(shape, residual, cfg), shape, residual, kernel_name(cfg, residual))


def _gemv_body(shape: W4A4Shape, residual: bool, cfg: GemvConfig):
    """The W4A4 GEMM for small M (decode): weights streamed from global memory into registers.

    At M <= 16 the cost is the weight bytes, so the kernel is built around keeping many of them
    in flight, with no shared-memory staging of W at all. K is cut into *pieces* of one group's
    bytes (G/2 per row: an INT4 group, or G/2 INT8 outlier channels, O being a multiple of G/2).
    A block owns 16 output columns; its warps take the pieces in rounds of ``k_warps x unroll``
    (piece ``round * k_warps * unroll + u * k_warps + warp``), and each warp loads round r+1's
    pieces into a second register set before it computes round r's, so a warp has ``unroll``
    pieces (``unroll`` KiB of weights at G = 128) in flight through the compute and the barrier.

    The weights are mma.sync's A operand (16 rows = the block's columns n) and the activation its
    B operand (8 columns = 8 rows m; a second mma for rows 8..15 when M > 8), so ``C[n, m]``.
    m16n8k32 s8 wants lane (g, t) (g = lane/4, t = lane%4) to hold k-slots 4t..4t+3 and
    16+4t..16+4t+3 of A rows g and g+8 and of B column g. Lane (g, t) loads with one 16-byte
    ``ld.global.nc`` (8 at G = 64) the bytes t*G/8 .. (t+1)*G/8 of the piece in W rows g and
    g+8 and in activation rows g and g+8; each packed word gives one mma: its low nibbles
    (times 16, as in the tiled kernel) for slots 4t.., its high nibbles for 16+4t... W and the
    activation put the same channel in the same slot, so the dot product is the group's, in a
    permuted order, which integers do not mind. An INT8 outlier piece takes two words per mma
    unwidened.

    The float order is the reference's: after each round the warps publish their pieces' int32
    sums (16 x 16 per piece) and float scales to a double-buffered shared array, one barrier,
    and every thread advances the float chain of its output elements over the round's pieces in
    piece order, ``acc += f32(isum) * (s_a * s_w)`` per INT4 group (FMA-contracted as in the
    tiled kernel, so the fused reference holds bit for bit), outlier pieces' sums added as
    integers and closed once at the end. A buffer is rewritten two rounds later, after every
    thread has passed the barrier that follows its last read, so one barrier per round is enough.
    Activation rows past M are read as row M - 1 (no branch): they only reach outputs that are
    not stored.
    """
    check_cuda_shape(shape)
    N, O, G = shape.N, shape.O, shape.G
    KW, U, THREADS, PR = cfg.k_warps, cfg.unroll, cfg.threads, cfg.round_pieces
    BN, SS = GEMV_BLOCK_N, GEMV_SUM_STRIDE
    if 16 * BN % THREADS or PR > 16:
        raise ValueError(f"gemv config {cfg}: at most 8 warps and 16 pieces per round")
    PIECE = G // 2  # bytes per row of one piece
    LANE_BYTES = PIECE // 4  # bytes per row a lane loads: 16 (G = 128) or 8 (G = 64)
    WORDS = LANE_BYTES // 4
    GROUPS = shape.groups
    PIECES = GROUPS + O // PIECE
    ROUNDS = -(-PIECES // PR)
    ELEMS = 16 * BN // THREADS
    REG_SET = U * 4 * WORDS  # per register set: U pieces x (W rows g, g+8, A rows g, g+8) x WORDS
    INT4_SCALE = 1.0 / WIDEN_FACTOR
    load = T.ptx[f"ld.global.nc.L1::no_allocate.v{WORDS}.u32"]
    load_act = T.ptx[f"ld.global.nc.v{WORDS}.u32"]

    @T.macro
    def load_rows(regs, at, ld, q4, q8, row, piece, byte):
        """``WORDS`` words at ``byte`` of ``row``'s bytes of ``piece`` into ``regs[at:]``."""
        if piece < GROUPS:
            T.evaluate(ld(*[regs[at + w] for w in range(WORDS)], q4.ptr_to([row, piece * PIECE + byte])))
        else:
            T.evaluate(ld(*[regs[at + w] for w in range(WORDS)],
                          q8.ptr_to([row, (piece - GROUPS) * PIECE + byte])))

    @T.macro
    def load_piece(piece, at, lane, n0, m0, M, A4, AS4, A8, AS8, W4, WS4, W8, WS8, regs, sreg, s_at):
        """One lane's bytes of `piece` (W rows g, g+8, then activation rows g, g+8) and one
        raw fp16 scale (lanes 0-15: column lane's; 16-31: activation row lane - 16's)."""
        g = lane // 4
        byte = lane % 4 * LANE_BYTES
        for h in T.unroll(2):
            load_rows(regs, at + h * WORDS, load, W4, W8, n0 + g + 8 * h, piece, byte)
        for h in T.unroll(2):
            load_rows(regs, at + (2 + h) * WORDS, load_act, A4, A8, T.min(m0 + g + 8 * h, M - 1), piece, byte)
        if lane < 16:
            if piece < GROUPS:
                sreg[s_at] = WS4[n0 + lane, piece]
            else:
                sreg[s_at] = WS8[n0 + lane, 0]
        else:
            row = T.min(m0 + lane - 16, M - 1)
            if piece < GROUPS:
                sreg[s_at] = AS4[row, piece]
            else:
                sreg[s_at] = AS8[row, 0]

    @T.macro
    def piece_sums(piece, at, M, regs, wide_a, wide_b, csum):
        """``C[n, m]`` of `piece`: csum[4h .. 4h+3] for activation rows 8h .. 8h+7."""
        for i in T.unroll(8):
            csum[i] = 0
        if piece < GROUPS:
            for w in T.unroll(WORDS):
                wide_a[0] = _lo_nibbles(regs[at + w])
                wide_a[1] = _lo_nibbles(regs[at + WORDS + w])
                wide_a[2] = _hi_nibbles(regs[at + w])
                wide_a[3] = _hi_nibbles(regs[at + WORDS + w])
                for h in T.unroll(2):
                    if T.Or(h == 0, M > 8):
                        wide_b[2 * h] = _lo_nibbles(regs[at + (2 + h) * WORDS + w])
                        wide_b[2 * h + 1] = _hi_nibbles(regs[at + (2 + h) * WORDS + w])
                        T.evaluate(_mma("m16n8k32", "int8", wide_a, 0, wide_b, 2 * h, csum, 4 * h))
        else:
            for w in T.unroll(WORDS // 2):
                wide_a[0] = regs[at + 2 * w]
                wide_a[1] = regs[at + WORDS + 2 * w]
                wide_a[2] = regs[at + 2 * w + 1]
                wide_a[3] = regs[at + WORDS + 2 * w + 1]
                for h in T.unroll(2):
                    if T.Or(h == 0, M > 8):
                        wide_b[2 * h] = regs[at + (2 + h) * WORDS + 2 * w]
                        wide_b[2 * h + 1] = regs[at + (2 + h) * WORDS + 2 * w + 1]
                        T.evaluate(_mma("m16n8k32", "int8", wide_a, 0, wide_b, 2 * h, csum, 4 * h))

    @T.macro
    def publish(piece, slot, lane, raw_scale, csum, sums, scales):
        """`piece`'s sums and float scale into round-buffer slot `slot`."""
        g = lane // 4
        t = lane % 4
        for h, e in T.grid(2, 4):
            sums[(slot * 16 + 8 * h + 2 * t + e % 2) * SS + g + 8 * (e // 2)] = csum[4 * h + e]
        value = T.Cast("float32", raw_scale)
        # The widened INT4 sums are 256 times too large (module docstring): the activation scale
        # takes the factor out.
        scales[slot * 32 + lane] = T.Select(T.And(lane >= 16, piece < GROUPS), value * T.float32(INT4_SCALE), value)

    @T.macro
    def body(M, A4, AS4, A8, AS8, W4, WS4, W8, WS8, R, Y):
        bx = T.launch_thread("blockIdx.x", N // BN)
        by = T.launch_thread("blockIdx.y", T.ceildiv(M, 16))
        tx = T.launch_thread("threadIdx.x", THREADS)
        sums = T.alloc_buffer((2 * PR * 16 * SS,), "int32", scope="shared")
        scales = T.alloc_buffer((2 * PR * 32,), "float32", scope="shared")
        regs = T.alloc_buffer((2 * REG_SET,), "uint32", scope="local")
        sreg = T.alloc_buffer((2 * U,), "float16", scope="local")
        wide_a = T.alloc_buffer((4,), "uint32", scope="local")
        wide_b = T.alloc_buffer((4,), "uint32", scope="local")
        csum = T.alloc_buffer((8,), "int32", scope="local")
        acc = T.alloc_buffer((ELEMS,), "float32", scope="local")
        osum = T.alloc_buffer((ELEMS,), "int32", scope="local")
        oscale = T.alloc_buffer((ELEMS,), "float32", scope="local")

        m0 = by * 16
        n0 = bx * BN
        warp = tx // 32
        lane = tx % 32
        operands = (lane, n0, m0, M, A4, AS4, A8, AS8, W4, WS4, W8, WS8, regs, sreg)

        for j in T.unroll(ELEMS):
            acc[j] = T.float32(0)
            osum[j] = 0
            oscale[j] = T.float32(0)
        for u in T.unroll(U):
            if u * KW + warp < PIECES:
                load_piece(u * KW + warp, u * 4 * WORDS, *operands, u)

        for pair in T.serial(-(-ROUNDS // 2)):
            for par in T.unroll(2):
                r = pair * 2 + par
                # TVM's sync planner cannot tell the double buffers' halves apart and would put a
                # barrier here itself; written out, the kernel can also sit in a run-time branch
                # (`w4a4_linear_prim_func`), where the planner may not insert one.
                T.tvm_storage_sync("shared")
                if r < ROUNDS:
                    # Next round's bytes into the other register set, before this round's use.
                    for u in T.unroll(U):
                        if (r + 1) * PR + u * KW + warp < PIECES:
                            load_piece((r + 1) * PR + u * KW + warp, (1 - par) * REG_SET + u * 4 * WORDS,
                                       *operands, (1 - par) * U + u)
                    for u in T.unroll(U):
                        piece = r * PR + u * KW + warp
                        if piece < PIECES:
                            piece_sums(piece, par * REG_SET + u * 4 * WORDS, M, regs, wide_a, wide_b, csum)
                            publish(piece, par * PR + u * KW + warp, lane, sreg[par * U + u], csum, sums, scales)
                    T.tvm_storage_sync("shared")
                    # The float chain, in piece order, of this thread's output elements.
                    for j in T.unroll(ELEMS):
                        col = (tx + j * THREADS) % BN
                        row = (tx + j * THREADS) // BN
                        if m0 + row < M:
                            for q in T.unroll(PR):
                                if r * PR + q < PIECES:
                                    slot = par * PR + q
                                    x = sums[(slot * 16 + row) * SS + col]
                                    s = scales[slot * 32 + 16 + row] * scales[slot * 32 + col]
                                    if r * PR + q < GROUPS:
                                        acc[j] = acc[j] + T.Cast("float32", x) * s
                                    else:
                                        osum[j] = osum[j] + x
                                        oscale[j] = s

        for j in T.unroll(ELEMS):
            col = (tx + j * THREADS) % BN
            row = (tx + j * THREADS) // BN
            if O > 0:
                acc[j] = acc[j] + T.Cast("float32", osum[j]) * oscale[j]
            if m0 + row < M:
                if residual:
                    Y[m0 + row, n0 + col] = T.Cast("float16", acc[j] + T.Cast("float32", R[m0 + row, n0 + col]))
                else:
                    Y[m0 + row, n0 + col] = T.Cast("float16", acc[j])

    return body


# ---------------------------------------------------------------------------------------------
# Building many kernels at once (tests, benchmarks)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One CUDA W4A4 library to build: ``kind`` "gemm" (`w4a4_gemm`), "gemv" (`w4a4_gemv`) or
    "linear" (`w4a4_linear`), for ``archs``."""

    kind: str
    archs: tuple[str, ...]
    N: int
    K: int
    G: int
    O: int
    residual: bool

    def config(self) -> "TileConfig | GemvConfig":
        from deploy.targets import make_target
        from tir_kernels.w4a4_gemm import variant_for

        return GEMV if self.kind == "gemv" else TILED[variant_for(make_target("cuda", list(self.archs)))]

    def function_name(self) -> str:
        """The PrimFunc's name in the built library."""
        return kernel_name(self.config(), self.residual, "linear" if self.kind == "linear" else "")

    def file_name(self) -> str:
        tag = "-".join(self.archs)
        return f"w4a4_{self.kind}_{tag}_N{self.N}_K{self.K}_G{self.G}_O{self.O}_r{int(self.residual)}.so"


def build_kernel(spec: KernelSpec, out_dir: str) -> str:
    """Compile ``spec`` with nvcc (SASS for each arch, PTX of the lowest) and export it."""
    import os

    from atom_tvm.cuda_build import compile_cuda
    from deploy.targets import make_target
    from tir_kernels.w4a4_gemm import w4a4_gemm, w4a4_gemv, w4a4_linear

    make = {"gemm": w4a4_gemm, "gemv": w4a4_gemv, "linear": w4a4_linear}[spec.kind]
    func = make(make_target("cuda", list(spec.archs)), spec.N, spec.K, spec.G, spec.O, spec.residual)
    executable = compile_cuda(func, spec.archs)
    path = os.path.join(out_dir, spec.file_name())
    executable.export_library(path)
    return path


def build_kernels(specs, out_dir: str, processes: int | None = None, build=None) -> dict:
    """``build(spec, out_dir)`` (default `build_kernel`; the dense kernels pass their own, a
    module-level function so that workers can import it) for every spec, in parallel processes
    (nvcc is the slow part)."""
    build = build or build_kernel
    import concurrent.futures
    import multiprocessing
    import os

    specs = list(dict.fromkeys(specs))
    processes = processes or min(len(specs), os.cpu_count() or 1)
    if processes <= 1:
        return {spec: build(spec, out_dir) for spec in specs}
    # spawn: a fresh interpreter per worker, not a fork of one that holds TVM's thread pools.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
        paths = pool.map(build, specs, [out_dir] * len(specs))
        return dict(zip(specs, paths))
