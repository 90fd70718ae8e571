"""Probe (not wired in): W4A4 tile shapes for mid M, against the gemv and the committed 128x128 tiles.

    python bench/tiers_probe.py --json $OUT/tiers.json

For each shape and M: GPU time of `w4a4_gemv`, the committed `sm90_wgmma` (128x128, two warpgroups)
and `WgmmaConfig`s of one warpgroup (64x128, 64x64), each on rotating weight copies as
bench/gemm.py times; each probe config's output is checked bit for bit against the fused reference
at one M per shape (a partial row tile).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (15360, 5120), (27648, 5120), (5120, 13824)]
ROWS = (16, 32, 64, 96, 128, 192, 256)
CHECK_M = 96
G, O = 128, 128
CONFIGS = {"wg64x128": (64, 128, 4), "wg64x64": (64, 64, 4)}


def make(kind: str, N: int, K: int):
    from tir_kernels import gemm_common as gc
    from tir_kernels.w4a4_gemm import W4A4Shape

    shape = W4A4Shape(N, K, G, O)
    if kind == "gemv":
        func = gc.w4a4_gemv_prim_func(shape, False)
    elif kind == "wg128x128":
        func = gc.w4a4_cuda_prim_func(shape, False, gc.TILED["sm90_wgmma"])
    else:
        bm, bn, warps = CONFIGS[kind]
        func = gc.w4a4_cuda_prim_func(shape, False, gc.WgmmaConfig(kind, bm, bn, warps, 1, 8, widen=True))
    return func.with_attr("global_symbol", f"{kind}_{N}_{K}")


def build(job) -> str:
    kind, N, K, out = job
    from atom_tvm.cuda_build import compile_cuda

    path = f"{out}/{kind}_{N}_{K}.so"
    compile_cuda(make(kind, N, K), ("sm_90a",)).export_library(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    import torch
    import tvm

    from bench.gemm import ROTATE_BYTES, _rotating, _w4a4_activation, _w4a4_weight, check, gpu_time

    kinds = ["gemv", "wg128x128", *CONFIGS]
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(kind, N, K, tmp) for N, K in SHAPES for kind in kinds]
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(16, mp_context=context) as pool:
            paths = dict(zip([(k, N, K) for k, N, K, _ in jobs], pool.map(build, jobs)))
        funcs = {key: tvm.runtime.load_module(path)[f"{key[0]}_{key[1]}_{key[2]}"] for key, path in paths.items()}
    rows = []
    for N, K in SHAPES:
        weights = _rotating(lambda: _w4a4_weight(torch, N, K), ROTATE_BYTES)
        tvm_w = [[tvm.runtime.from_dlpack(t) for t in w] for w in weights]
        for M in ROWS:
            act = _w4a4_activation(torch, M, K)
            tvm_act = [tvm.runtime.from_dlpack(t) for t in act]
            y = tvm.runtime.from_dlpack(torch.empty(M, N, device="cuda", dtype=torch.float16))
            row = {"N": N, "K": K, "M": M}
            for kind in kinds:
                func = funcs[(kind, N, K)]
                row[kind] = gpu_time(torch, lambda i: func(*tvm_act[:4], *tvm_w[i % len(tvm_w)], y), args.iters)
                if M == CHECK_M and kind in CONFIGS:
                    row[f"{kind}_exact"] = check(torch, func, act, weights[0], N, K)
            rows.append(row)
            print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
