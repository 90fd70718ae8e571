"""How fast one kernel launch can read N bytes from HBM: the ceiling for the memory-bound kernels.

    python bench/read_bandwidth.py [--iters 30] [--json out.json]

A decode GEMV reads a few MB once per call; a kernel that short never reaches the copy
bandwidth of a large transfer (the first bytes' latency and the ramp of the launch are not
amortised). This times the simplest possible reader at the sizes of `bench/gemm.py`'s decode
rows (the packed INT4 weight bytes of each shape) and at 256 MiB: blocks of 256 threads, each
thread issuing all of its 16-byte ``ld.global.nc`` loads at once, then XOR-ing them into one
word (so nothing is elided), one block per 16 rows of the weight matrix, i.e. the GEMV's grid.
Two access patterns over the same bytes: each warp instruction a contiguous 512-byte run
(``contiguous``), or 8 rows x 64 bytes as the GEMV's mma fragments want them (``8 rows``).
Timing as `bench/gemm.py` (CUDA profiler, rotating copies so every call reads HBM).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gemm import COPY_GBPS, O, SHAPES, _rotating, gpu_time  # noqa: E402

PATTERNS = ("contiguous", "8 rows")
#: (label, rows, bytes per row): the INT4 part of each decode shape's weight, and 256 MiB.
SIZES = [(label, N, (K - O) // 2) for label, N, K in SHAPES] + [("256 MiB", 131072, 2048)]


def read_kernel(rows: int, row_bytes: int, pattern: str):
    """Each block reads 16 rows x ``row_bytes`` (its loads all issued before the first use)."""
    from tvm.script import tirx as T

    tiles = 2 * row_bytes // 64  # (8 rows x 64 bytes) tiles per block
    loads = -(-tiles // 8)  # per thread: 8 warps share the tiles
    blocks = rows // 16
    load = T.ptx["ld.global.nc.L1::no_allocate.v4.u32"]
    contiguous = pattern == PATTERNS[0]

    @T.prim_func
    def read(a: T.handle, o: T.handle):
        A = T.match_buffer(a, (rows, row_bytes), "uint8")
        Out = T.match_buffer(o, (blocks * 256,), "int32")
        bx = T.launch_thread("blockIdx.x", blocks)
        tx = T.launch_thread("threadIdx.x", 256)
        regs = T.alloc_buffer((4 * loads,), "uint32", scope="local")
        x = T.alloc_buffer((1,), "uint32", scope="local")
        tile0 = tx // 32
        lane = tx % 32
        for v in T.unroll(loads):
            regs[4 * v] = T.uint32(0)
            if v * 8 + tile0 < tiles:
                if contiguous:
                    at = (v * 8 + tile0) * 512 + lane * 16
                    T.evaluate(load(*[regs[4 * v + w] for w in range(4)], A.ptr_to([bx * 16 + at // row_bytes,
                                                                                   at % row_bytes])))
                else:
                    tile = v * 8 + tile0
                    T.evaluate(load(*[regs[4 * v + w] for w in range(4)], A.ptr_to([
                        bx * 16 + tile % 2 * 8 + lane // 4, tile // 2 * 64 + lane % 4 * 16])))
        x[0] = T.uint32(0)
        for v in T.unroll(loads):
            x[0] = x[0] ^ regs[4 * v]
        Out[bx * 256 + tx] = T.reinterpret("int32", x[0])

    return read.with_attr("global_symbol", "read_kernel")


def build(job, out_dir: str) -> str:
    """Compile one (rows, row_bytes, pattern) reader for sm_90a (for `build_kernels`' workers)."""
    import os

    from atom_tvm.cuda_build import compile_cuda

    rows, row_bytes, pattern = job
    executable = compile_cuda(read_kernel(rows, row_bytes, pattern), ["sm_90a"])
    path = os.path.join(out_dir, f"read_{rows}_{row_bytes}_{PATTERNS.index(pattern)}.so")
    executable.export_library(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch
    import tvm

    from tir_kernels.gemm_common import build_kernels

    jobs = [(rows, row_bytes, p) for _, rows, row_bytes in SIZES for p in PATTERNS]
    with tempfile.TemporaryDirectory() as tmp:
        libs = build_kernels(jobs, tmp, build=build)
        funcs = {job: tvm.runtime.load_module(libs[job])["read_kernel"] for job in jobs}
    results = []
    print(f"{torch.cuda.get_device_name()}: one launch reading N bytes (% of the {COPY_GBPS} GB/s copy)")
    for label, rows, row_bytes in SIZES:
        buffers = _rotating(lambda: torch.randint(0, 256, (rows, row_bytes), device="cuda", dtype=torch.uint8),
                            512 << 20)
        tvm_buffers = [tvm.runtime.from_dlpack(t) for t in buffers]
        out = tvm.runtime.from_dlpack(torch.empty(rows // 16 * 256, device="cuda", dtype=torch.int32))
        for pattern in PATTERNS:
            func = funcs[(rows, row_bytes, pattern)]
            us = gpu_time(torch, lambda i: func(tvm_buffers[i % len(tvm_buffers)], out), args.iters)
            gbps = rows * row_bytes / us / 1e3
            results.append({"size": label, "bytes": rows * row_bytes, "pattern": pattern, "us": us, "gbps": gbps,
                            "of_copy": gbps / COPY_GBPS})
            print(f"{label:18s} {rows * row_bytes / 1e6:7.1f} MB {pattern:10s} {us:8.2f} us {gbps:6.0f} GB/s "
                  f"{gbps / COPY_GBPS:4.0%}", flush=True)
        del buffers, tvm_buffers
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
