"""Probe (not committed): RMSNorm + quantize for a residual stream stored in one channel order,
i.e. rmsnorm_reorder_quantize with the identity index: no staging, no gather. One block of 128
threads (the LANES of the sum, same order) per row, straight from global memory, like SiLU-mul."""
from __future__ import annotations

from tvm.script import tirx as T

from tir_kernels import quantize as qk


def inorder_rmsnorm_quantize(K, G, O, clip, eps):
    spec = qk._Spec("rmsnorm", K, G, O, clip, eps)
    N = K - O
    threads = qk.LANES
    warps = threads // 32
    chunks = K // qk.VEC
    steps = -(-chunks // threads)
    q_chunks = N // qk.VEC
    o_steps = -(-O // threads)
    group_lanes = G // qk.VEC
    c4, c8, eps32 = spec.c4, spec.c8, spec.eps

    @T.prim_func
    def cuda(x_h: T.handle, w_h: T.handle, q4_h: T.handle, s4_h: T.handle, q8_h: T.handle, s8_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        M = T.int64()
        X = T.match_buffer(x_h, (M, K), "float16")
        W = T.match_buffer(w_h, (K,), "float16")
        Q4, S4, Q8, S8 = qk._match_outputs(q4_h, s4_h, q8_h, s8_h, M, spec)
        Q4w = T.decl_buffer((M, N // 8), "uint32", data=Q4.data)
        row = T.launch_thread("blockIdx.x", M)
        tx = T.launch_thread("threadIdx.x", threads)
        part_sum = T.alloc_shared((warps,), "float32")
        part_max = T.alloc_shared((warps,), "float32")
        xv = T.alloc_local((steps * 8,), "float16")
        wv = T.alloc_local((steps * 8,), "float16")
        for step in T.unroll(steps):
            if tx + step * threads < chunks:
                for e in T.vectorized(8):
                    xv[step * 8 + e] = X[row, (tx + step * threads) * 8 + e]
                for e in T.vectorized(8):
                    wv[step * 8 + e] = W[(tx + step * threads) * 8 + e]
        sumsq = T.alloc_local((1,), "float32")
        sumsq[0] = T.float32(0)
        for step in T.unroll(steps):
            if tx + step * threads < chunks:
                for e in T.unroll(8):
                    sumsq[0] = sumsq[0] + T.Cast("float32", xv[step * 8 + e]) * T.Cast("float32", xv[step * 8 + e])
        qk._block_reduce(sumsq, 1, part_sum, tx, warps, qk._add)
        rs = T.alloc_local((1,), "float32")
        rs[0] = qk._cuda_rms_reciprocal(sumsq[0], K, eps32)
        if O > 0:
            ov = T.alloc_local((o_steps,), "float32")
            for step in T.unroll(o_steps):
                ov[step] = T.float32(0)
                if tx + step * threads < O:
                    ov[step] = (T.Cast("float32", X[row, N + tx + step * threads]) * rs[0]) * T.Cast(
                        "float32", W[N + tx + step * threads])
            qk._quantize_outliers(ov, 1, row, M, tx, threads, o_steps, Q8, S8, part_max, O, c8)
        elif tx == 0:
            S8[row, 0] = T.float16(0)
        vals = T.alloc_local((8,), "float32")
        amax = T.alloc_local((1,), "float32")
        for step in T.unroll(-(-q_chunks // threads)):
            for e in T.unroll(8):
                vals[e] = T.float32(0)
            if tx + step * threads < q_chunks:
                for e in T.unroll(8):
                    vals[e] = (T.Cast("float32", xv[step * 8 + e]) * rs[0]) * T.Cast("float32", wv[step * 8 + e])
            qk._float_group_absmax(vals, amax, 1, group_lanes)
            qk._quantize_chunks(vals, amax, 1, tx + step * threads, tx + step * threads < q_chunks,
                                row, M, Q4w, S4, group_lanes, c4, False)

    return cuda.with_attr("global_symbol", f"inorder_rmsnorm_quantize_k{K}_g{G}_o{O}")
