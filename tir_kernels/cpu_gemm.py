"""A dlight schedule rule for the "NT" matmuls of Linear layers on multi-core SIMD CPUs.

After `FuseTransposeMatmul` and `LegalizeOps`, every `nn.Linear` of a model is a PrimFunc with one
reduction block

    Y[m..., n] += X[m..., k] * W[n, k]          (W stored [out, in], row-major: the "NT" layout)

where the m iterators are the token/batch dims (often one of them dynamic: `seq_len`,
`batch_size`), sometimes followed by elementwise blocks (a residual add) that FuseOps put in the
same function. TVM's llvm pipeline leaves such functions as naive single-threaded loops; this rule
gives them a multi-threaded SIMD schedule, the tiles of n spread over the cores:

* GEMV, for a static and small number of rows (decode, the LM head): memory bound, so every
  weight row is streamed exactly once, contiguously along k, as a k-vectorised dot product
  (`rfactor` into a cache line of partial sums kept in registers, then one horizontal sum per
  output); each core reads one sequential stream of W.
* GEMM on narrow SIMD (the generic x86-64 target is SSE2; NEON): "dot tiles", the same dot
  products for MR rows of X x NR rows of W at once, so each loaded vector is used NR (or MR)
  times; both operands are read in place.
* GEMM on wide SIMD (AVX2, AVX-512): register-blocked outer products. Each core repacks a panel
  of NR weight rows k-major (`[K, NR]`, so NR consecutive outputs are one vector load) and sweeps
  the rows of X in tiles of MR, holding the MR x NR accumulators in vector registers.

For the GEMMs the row dim (dynamic: `seq_len`) is padded to a multiple of MR (`pad_einsum`), so
no tile needs a bounds check and the accumulator tile stays a small constant-size buffer that
LLVM promotes to registers. Elementwise epilogues run on each finished tile. fp32 sums are
reassociated (per-lane partial sums), so results differ from the naive loop in the last bits.

Use: ``dl.ApplyDefaultSchedule(CPUGemm())`` after the legalize passes of an llvm build.
"""

from __future__ import annotations

import dataclasses

from tvm import s_tir, tirx
from tvm.ir.expr import TensorLoad
from tvm.runtime import DataType
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.s_tir.schedule import LoopRV, SBlockRV
from tvm.target import Target, codegen

__all__ = ["CPUGemm"]


@dataclasses.dataclass(frozen=True)
class VectorUnit:
    """What the schedule needs to know about the target's SIMD unit."""

    bytes: int  # width of one vector register
    registers: int  # number of vector registers

    @classmethod
    def of(cls, target: Target) -> "VectorUnit":
        """Read the SIMD width from the target's CPU features.

        A plain ``{"kind": "llvm"}`` target is generic x86-64 (SSE2: 16 x 16-byte registers); the
        code generated for wider vectors than the target has would only be split again by LLVM,
        so the tile sizes follow what the target really offers.
        """

        def has(feature: str) -> bool:
            try:
                return bool(codegen.llvm_cpu_has_features(feature, target))
            except Exception:  # pylint: disable=broad-except
                return False  # feature name unknown to this target's architecture

        if has("avx512f"):
            return cls(bytes=64, registers=32)
        if has("avx"):
            return cls(bytes=32, registers=16)
        if has("sve") or has("neon"):
            return cls(bytes=16, registers=32)
        return cls(bytes=16, registers=16)

    def lanes(self, dtype: str) -> int:
        """Elements of `dtype` in one vector register."""
        return max(1, self.bytes * 8 // DataType(dtype).bits)


@dataclasses.dataclass
class NTMatmul:
    """A matched `Y[m..., n] += X[m..., k] * W[n, k]` block and its elementwise epilogue."""

    block: SBlockRV
    m_loops: list[LoopRV]  # in loop order
    m_extents: list[tirx.Expr]
    n_loop: LoopRV
    n_extent: int
    k_loop: LoopRV
    k_extent: int
    weight_index: int  # position of W among the block's reads
    dtype: str  # of the multiply's operands
    epilogue: list[SBlockRV]

    def static_rows(self) -> int | None:
        """The number of rows of X (product of the m extents), or None when it is dynamic."""
        rows = 1
        for extent in self.m_extents:
            if not isinstance(extent, tirx.IntImm):
                return None
            rows *= int(extent)
        return rows

    def row_position(self) -> int:
        """Which m loop gets tiled: the innermost one whose extent is not 1."""
        for i in reversed(range(len(self.m_extents))):
            if not (isinstance(self.m_extents[i], tirx.IntImm) and int(self.m_extents[i]) == 1):
                return i
        return len(self.m_extents) - 1


def _strip_cast(expr: tirx.Expr) -> tirx.Expr:
    return expr.value if isinstance(expr, tirx.Cast) else expr


def _nt_roles(store, x_load, w_load, k, kinds):
    """(x_load, w_load, row iterators, n) if `store += x_load * w_load` is `Y[m..., n] += X[m...,
    k] * W[n, k]`, else None."""

    def index_vars(indices):
        """The iterators an access is indexed by; None unless each index is one or a constant."""
        if not all(isinstance(i, tirx.IntImm) or (isinstance(i, tirx.Var) and i in kinds)
                   for i in indices):
            return None
        return [i for i in indices if isinstance(i, tirx.Var)]

    out_vars = index_vars(store.indices)
    x_vars, w_vars = index_vars(x_load.indices), index_vars(w_load.indices)
    if out_vars is None or x_vars is None or w_vars is None:
        return None
    # NT layout: W is [n, k] and both operands are contiguous along k.
    if not (x_vars and x_load.indices[-1].same_as(k)):
        return None
    if not (len(w_vars) == 2 and w_load.indices[-1].same_as(k)):
        return None
    n, m_vars = w_vars[0], x_vars[:-1]
    # Each spatial iterator is a row (of X) or the column n (of W), never both (a batched matmul),
    # and the output is laid out [rows..., n].
    if any(v.same_as(n) for v in m_vars) or len(out_vars) != len(m_vars) + 1:
        return None
    if not store.indices[-1].same_as(n) or any(not a.same_as(b) for a, b in zip(out_vars, m_vars)):
        return None
    if len(kinds) != len(m_vars) + 2:  # no iterator beside the rows, n and k
        return None
    return x_load, w_load, m_vars, n


def _match_nt_matmul(sch: s_tir.Schedule) -> NTMatmul | None:
    """Find the NT matmul block of the function, or None when the function is something else."""
    infos = normalize_prim_func(sch)
    if not infos or not infos[0].is_reduction():
        return None
    main, epilogue = infos[0], infos[1:]
    # Only elementwise work may follow the matmul (it is inlined into the write-back); anything
    # else (another reduction, a transpose...) is left to other rules.
    if any(not info.is_injective() or info.is_reduction() for info in epilogue):
        return None

    block = sch.get(main.block_rv)
    store = block.body
    if not isinstance(store, tirx.BufferStore) or len(block.reads) < 2:
        return None
    value = store.value
    if not (isinstance(value, tirx.Add) and isinstance(_strip_cast(value.b), tirx.Mul)):
        return None
    acc, product = value.a, _strip_cast(value.b)
    operands = _strip_cast(product.a), _strip_cast(product.b)
    # In TVM 0.27 a load is an `ir.TensorLoad` whose `source` is the buffer (itself a Var).
    if not all(isinstance(e, TensorLoad) for e in (acc, *operands)):
        return None
    if not acc.source.same_as(store.buffer):
        return None
    reduce_vars = [iv.var for iv in block.iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
    if len(reduce_vars) != 1:
        return None
    k = reduce_vars[0]
    kinds = {iv.var: iv for iv in block.iter_vars}
    roles = _nt_roles(store, *operands, k, kinds) or _nt_roles(store, *operands[::-1], k, kinds)
    if roles is None:
        return None
    x_load, w_load, m_vars, n = roles

    n_extent, k_extent = kinds[n].dom.extent, kinds[k].dom.extent
    if not isinstance(n_extent, tirx.IntImm) or not isinstance(k_extent, tirx.IntImm):
        return None
    if x_load.source.dtype != w_load.source.dtype:  # (mixed-precision GEMMs: not this rule)
        return None

    # normalize_prim_func bound each iterator to one loop; they must nest as rows..., n, k.
    loop_of = {it.var: it.loop_rv for it in main.iters}
    if any(v not in loop_of for v in [*m_vars, n, k]):
        return None
    nest = [sch.get(loop).loop_var for loop in sch.get_loops(main.block_rv)]
    wanted = [sch.get(loop_of[v]).loop_var for v in [*m_vars, n, k]]
    if len(nest) != len(wanted) or any(not a.same_as(b) for a, b in zip(nest, wanted)):
        return None

    reads = [r.source for r in block.reads]
    weight_index = next((i for i, b in enumerate(reads) if b.same_as(w_load.source)), None)
    if weight_index is None:
        return None
    return NTMatmul(
        block=main.block_rv,
        m_loops=[loop_of[v] for v in m_vars],
        m_extents=[kinds[v].dom.extent for v in m_vars],
        n_loop=loop_of[n],
        n_extent=int(n_extent),
        k_loop=loop_of[k],
        k_extent=int(k_extent),
        weight_index=weight_index,
        dtype=str(x_load.source.dtype),
        epilogue=[info.block_rv for info in epilogue],
    )


class CPUGemm(CPUScheduleRule):
    """Schedule NT matmuls (`Y = X @ W.T` + optional elementwise epilogue) for SIMD CPUs.

    Parameters
    ----------
    gemv_max_rows : int
        Functions whose number of rows is static and at most this use the GEMV strategy; all
        others (including every dynamic row count) one of the GEMM ones.
    """

    def __init__(self, gemv_max_rows: int = 4):
        self.gemv_max_rows = gemv_max_rows

    def apply(  # pylint: disable=arguments-renamed
        self,
        func: tirx.PrimFunc,
        target: Target,
        _tunable: bool,
    ) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        match = _match_nt_matmul(sch)
        if match is None:
            return None
        vector = VectorUnit.of(target)
        rows = match.static_rows()
        try:
            if rows is not None and rows <= self.gemv_max_rows:
                self._schedule_gemv(sch, match, vector)
            elif vector.bytes <= 16:
                self._schedule_dot_tiles(sch, match, vector)
            else:
                self._schedule_panels(sch, match, vector)
        except s_tir.ScheduleError:
            # A shape this rule did not foresee: leave the function to the default lowering
            # (correct, only slow) rather than failing the whole build.
            return None
        return sch

    # ---------------------------------------------------------------------------------------
    # Dot-product tiles along k: GEMV, and GEMM on narrow SIMD.
    # ---------------------------------------------------------------------------------------
    def _schedule_gemv(self, sch: s_tir.Schedule, mm: NTMatmul, vector: VectorUnit) -> None:
        """All (few) rows against one weight row at a time.

        One weight row per step: each core then reads its share of W as a single sequential
        stream, which measured faster than interleaving 2-8 rows to reuse the X vectors (X is a
        few KiB and stays in L1). One cache line (64 bytes) of partial sums per output, in as
        many vectors as that takes (4 on SSE): whole lines of W per step, independent
        accumulators to hide the add latency, and only a 16-element horizontal sum at the end
        (a longer one cost AVX-512 more than it saved).
        """
        lanes = vector.lanes(mm.dtype)
        line = max(lanes, 64 * 8 // DataType(mm.dtype).bits)
        k_inner = next((c for c in (line, lanes) if mm.k_extent % c == 0), lanes)
        rows = [sch.fuse(*mm.m_loops)] if len(mm.m_loops) > 1 else mm.m_loops
        self._dot_tiles(sch, mm, outer=[], row_tile=[], row_inner=rows, n_tile=1, k_inner=k_inner)

    def _schedule_dot_tiles(self, sch: s_tir.Schedule, mm: NTMatmul, vector: VectorUnit) -> None:
        """MR rows of X against NR rows of W, with MR x NR vectors of partial sums along k.

        Both operands are read in their stored layout (no repacking, which at 32 rows cost a
        quarter of the time), and the horizontal sums at the end are short on 4-lane SIMD. On
        SSE (16 registers) 2 x 4 tiles measured best: 8 accumulators plus 6 loaded vectors.
        NR divides n (always true of real layer sizes), so only the rows need padding.
        """
        n_tile = next(c for c in (4, 2, 1) if mm.n_extent % c == 0)
        m_tile = max(1, vector.registers // 2 // 4)
        self._pad(sch, mm, m_tile, 1)
        row = mm.row_position()
        m_loops = sch.get_loops(mm.block)[:-2]
        row_outer, row_inner = sch.split(m_loops[row], [None, m_tile])
        outer = m_loops[:row] + m_loops[row + 1:]
        self._dot_tiles(sch, mm, outer=outer, row_tile=[row_outer], row_inner=[row_inner],
                        n_tile=n_tile, k_inner=vector.lanes(mm.dtype))

    @staticmethod
    def _dot_tiles(sch: s_tir.Schedule, mm: NTMatmul, outer: list[LoopRV], row_tile: list[LoopRV],
                   row_inner: list[LoopRV], n_tile: int, k_inner: int) -> None:
        """Loops `outer.., n tiles (parallel), row_tile.., k / k_inner, row_inner.., n_tile,
        k_inner (vector)`, accumulating `k_inner`-lane partial sums per output in registers; each
        tile then sums its lanes and applies the epilogue."""
        block = mm.block
        n_loop, k_loop = sch.get_loops(block)[-2:]
        n_outer, n_inner = sch.split(n_loop, [None, n_tile])
        k_outer, k_lanes = sch.split(k_loop, [None, k_inner])
        sch.reorder(*outer, n_outer, *row_tile, k_outer, *row_inner, n_inner, k_lanes)
        # The lanes axis goes last in the partial-sum buffer, so that a vector of lanes is
        # contiguous there too (first, every vector access would be a strided gather).
        out_ndim = len(sch.get(block).writes[0].source.shape)
        partial = sch.rfactor(k_lanes, factor_axis=out_ndim)
        # rfactor gives the partial sums a copy of the loops and leaves the originals to the
        # block, now the horizontal sum; that sum moves into the partial sums' tile.
        loops = sch.get_loops(partial)[len(outer):]
        n_outer, tile, k_outer = loops[0], loops[len(row_tile)], loops[len(row_tile) + 1]
        inner = loops[len(row_tile) + 2:]
        sch.set_scope(partial, 0, "local")
        sch.reverse_compute_at(block, tile)
        # Padding copy-out and elementwise epilogue: one block, right after the tile's sums.
        tail = sch.get_consumers(block)
        if tail:
            sch.set_scope(block, 0, "local")
            while sch.get_consumers(tail[0]):
                sch.reverse_compute_inline(sch.get_consumers(tail[0])[0])
            sch.reverse_compute_at(tail[0], tile)

        sch.parallel(n_outer)
        for loop in inner[:-1]:
            sch.unroll(loop)
        sch.vectorize(inner[-1])
        init = sch.decompose_reduction(partial, k_outer)
        init_loops = sch.get_loops(init)[len(outer) + len(row_tile) + 1:]  # those in the tile
        for loop in init_loops[:-1]:
            sch.unroll(loop)
        sch.vectorize(init_loops[-1])

    # ---------------------------------------------------------------------------------------
    # GEMM on wide SIMD: register-blocked outer products over repacked weight panels.
    # ---------------------------------------------------------------------------------------
    def _schedule_panels(self, sch: s_tir.Schedule, mm: NTMatmul, vector: VectorUnit) -> None:
        """MR rows of X times a k-major panel of NR weight rows, NR outputs per vector.

        Each core repacks a panel of W to `[K, NR]` (contiguous along n) and sweeps all rows of
        X with it, holding MR x NR accumulators: 2 vectors wide, MR = a quarter of the register
        file. On AVX-512 (8 x 32) this measured about 2x the dot tiles at 128+ rows: their
        16-lane horizontal sums and lack of reuse cost more than the repacking.
        """
        lanes = vector.lanes(mm.dtype)
        n_tile, m_tile = 2 * lanes, max(1, vector.registers // 4)
        block = mm.block
        out_buffer = sch.get(block).writes[0].source
        w_pad = self._pad(sch, mm, m_tile, n_tile)
        # The accumulator tile: a local copy of the output written back once per tile, with
        # the copy-out of padding and the elementwise epilogue folded into that write-back.
        if sch.get(block).writes[0].source.same_as(out_buffer):
            write_back = sch.cache_write(block, 0, "local")
        else:
            write_back = sch.get_consumers(block)[0]
            sch.set_scope(block, 0, "local")
        for consumer in mm.epilogue:
            sch.reverse_compute_inline(consumer)

        row = mm.row_position()
        loops = sch.get_loops(block)
        m_loops, n_loop, k_loop = loops[:-2], loops[-2], loops[-1]
        row_outer, row_inner = sch.split(m_loops[row], [None, m_tile])
        n_outer, n_inner = sch.split(n_loop, [None, n_tile])
        # No blocking of the rows for cache: at 512 rows (the prefill chunk) the L3-resident X
        # swept once per panel measured as fast as 64-256-row blocks, whose split would add a
        # bounds check to every tile.
        other_rows = m_loops[:row] + m_loops[row + 1:]
        sch.reorder(*other_rows, n_outer, row_outer, k_loop, row_inner, n_inner)

        weight = sch.get(w_pad).writes[0].source if w_pad else None
        reads = [r.source for r in sch.get(block).reads]
        w_index = reads.index(weight) if w_pad else mm.weight_index
        iters = len(sch.get(block).iter_vars)  # rows..., n, k
        k_major = tirx.IndexMap.from_func(lambda *v: (v[-1], v[-2]), ndim=iters)
        panel = sch.reindex_cache_read(block, w_index, "global", k_major)
        if w_pad:  # the zero rows of padding are made while packing: no padded copy of W
            sch.compute_inline(w_pad)
        sch.compute_at(panel, n_outer)
        sch.reverse_compute_at(write_back, row_outer)

        sch.parallel(n_outer)
        sch.unroll(row_inner)
        sch.vectorize(n_inner)
        init = sch.decompose_reduction(block, k_loop)
        init_rows, init_n = sch.get_loops(init)[len(m_loops) + 1:]  # those in the tile
        sch.unroll(init_rows)
        sch.vectorize(init_n)
        sch.vectorize(sch.get_loops(write_back)[-1])

    @staticmethod
    def _pad(sch: s_tir.Schedule, mm: NTMatmul, m_tile: int, n_tile: int) -> SBlockRV | None:
        """Pad the tiled row dim to a multiple of `m_tile` and n to one of `n_tile` (`pad_einsum`:
        zero-filled copies of the inputs, the output written to a padded buffer and copied out).

        Then no tile needs a bounds check: with checks the accumulator tile's size would depend
        on the dynamic row count, and LLVM could not keep it in registers. Returns the block
        making the padded copy of W, if n was padded.
        """
        row = mm.row_position()
        rows = mm.m_extents[row]
        padding = [1] * (len(mm.m_loops) + 2)
        if not (isinstance(rows, tirx.IntImm) and int(rows) % m_tile == 0):
            padding[row] = m_tile
        if mm.n_extent % n_tile:
            padding[-2] = n_tile
        if all(p == 1 for p in padding):
            return None
        weight = sch.get(mm.block).reads[mm.weight_index].source
        sch.pad_einsum(mm.block, padding)
        if padding[-2] == 1:
            return None
        return next(p for p in sch.get_producers(mm.block)
                    if any(r.source.same_as(weight) for r in sch.get(p).reads))
