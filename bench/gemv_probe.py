"""Time `w4a4_gemv` configurations (warps per block x pieces per warp and round) at M = 1 and 16.

    python bench/gemv_probe.py [--configs 4x4,8x2] [--iters 20] [--json out.json]

Needs a GPU, torch and TVM with its compiler. Shapes, operands, timing (CUDA profiler, rotating
weight copies so every call reads HBM) and the bit-exactness check are `bench/gemm.py`'s; the
committed configuration (`gemm_common.GEMV`) is what `bench/gemm.py` times.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gemm import COPY_GBPS, G, O, SHAPES, _rotating, _w4a4_activation, _w4a4_weight, check, gpu_time, \
    w4a4_weight_bytes  # noqa: E402


@dataclasses.dataclass(frozen=True)
class ProbeSpec:
    k_warps: int
    unroll: int
    N: int
    K: int

    def function_name(self) -> str:
        return f"w4a4_gemv_w{self.k_warps}u{self.unroll}"


def build_probe(spec: ProbeSpec, out_dir: str) -> str:
    """Compile one configuration for sm_90a (a module-level function, for the build workers)."""
    import os

    from atom_tvm.cuda_build import compile_cuda
    from tir_kernels.gemm_common import GemvConfig, w4a4_gemv_prim_func
    from tir_kernels.w4a4_gemm import W4A4Shape

    cfg = GemvConfig(f"gemv_w{spec.k_warps}u{spec.unroll}", spec.k_warps, spec.unroll)
    func = w4a4_gemv_prim_func(W4A4Shape(spec.N, spec.K, G, O), False, cfg)
    executable = compile_cuda(func, ["sm_90a"])
    path = os.path.join(out_dir, f"gemv_w{spec.k_warps}u{spec.unroll}_N{spec.N}_K{spec.K}.so")
    executable.export_library(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="4x4,8x2,4x2,2x8", help="k_warps x unroll, comma-separated")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch
    import tvm

    from tir_kernels.gemm_common import build_kernels

    configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
    specs = [ProbeSpec(kw, u, N, K) for kw, u in configs for _, N, K in SHAPES]
    with tempfile.TemporaryDirectory() as tmp:
        libs = build_kernels(specs, tmp, build=build_probe)
        funcs = {spec: tvm.runtime.load_module(libs[spec])[spec.function_name()] for spec in specs}
    results = []
    for label, N, K in SHAPES:
        weights = _rotating(lambda: _w4a4_weight(torch, N, K), 256 << 20)
        tvm_w = [[tvm.runtime.from_dlpack(t) for t in w] for w in weights]
        for M in (1, 16):
            act = _w4a4_activation(torch, M, K)
            tvm_act = [tvm.runtime.from_dlpack(t) for t in act]
            tvm_y = tvm.runtime.from_dlpack(torch.empty(M, N, device="cuda", dtype=torch.float16))
            for spec in specs:
                if (spec.N, spec.K) != (N, K):
                    continue
                func = funcs[spec]
                us = gpu_time(torch, lambda i: func(*tvm_act, *tvm_w[i % len(tvm_w)], tvm_y), args.iters)
                gbps = w4a4_weight_bytes(N, K) / us / 1e3
                exact = check(torch, func, act, weights[0], N, K)
                results.append({"shape": label, "M": M, "k_warps": spec.k_warps, "unroll": spec.unroll,
                                "us": us, "weight_gbps": gbps, "of_copy": gbps / COPY_GBPS, "checked": exact})
                print(f"{label:18s} M={M:2d} {spec.k_warps}x{spec.unroll}: {us:7.2f} us {gbps:6.0f} GB/s "
                      f"{gbps / COPY_GBPS:4.0%} exact={exact}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
