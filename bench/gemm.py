"""Benchmark the W4A4 GEMM (Hopper path) and the dense fp16 / int8 GEMMs against cuBLAS through torch.

    python bench/gemm.py --json docs/bench/gemm_h200.json --png docs/bench/gemm_h200.png
    python bench/gemm.py --plot docs/bench/gemm_h200.json --png docs/bench/gemm_h200.png
    python bench/gemm.py --rows 1,16 --merge docs/bench/gemm_h200.json --json ... --png ...

The first form needs a GPU, torch and TVM with its compiler; the second only matplotlib (the PNG
can be drawn wherever matplotlib is). Kernel times are GPU time from the CUDA profiler, summed
over every kernel an operation launches (cuBLAS may run two), so Python launch overhead, which
is larger than a decode GEMV, does not count. Every call reads a different copy of the weights
(at least 256 MiB of copies), so memory-bound rows measure HBM, not the 50 MiB L2.

What is timed: the GEMM alone on operands already in their formats (pre-quantized INT4/INT8
codes and scales for W4A4; fp16 for cuBLAS fp16; int8 for torch._int_mm, whose int32 output
is not rescaled). W4A4 is `w4a4_linear`, what the models call (the gemv kernel for small M, 64x64
wgmma blocks (64x128 on very wide weights) for up to a few hundred rows, 128x128 above:
`linear_tiers`, chosen at run time); up to `SPLIT_ROWS` rows the gemv and the 128x128 kernel are
also timed alone (`gemv_us`, `gemm_us`).
torch._int_mm needs M > 16, so its M <= 16 rows run 32 padded rows.
The dense kernels of `tir_kernels.dense_gemm` (the baselines' fp16 and W8A8 GEMMs) run on the
same fp16 / int8 operands as cuBLAS, the int8 one with its per-token and per-channel scales
applied (cuBLAS int8 returns raw int32). ``--probe`` also times the tilings of
`dense_gemm.PROBE_CONFIGS` on the first shape at every M.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: (label, N, K): K counts all input channels, of which O = 128 are INT8 outliers.
SHAPES = [("4096x4096", 4096, 4096), ("llama2-7b up/gate", 11008, 4096), ("llama2-7b down", 4096, 11008)]
ROWS = (1, 16, 128, 512, 1024, 4096)
G, O = 128, 128
ARCHS = ("sm_90a",)
#: Up to this M both W4A4 kernels are also timed on their own.
SPLIT_ROWS = 128
ROTATE_BYTES = 256 << 20
#: Device-to-device copy bandwidth measured on the H200 (docs/bench/quantize_kernels.md): the
#: yardstick for the decode rows, whose cost is streaming the weight bytes once.
COPY_GBPS = 4238


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the measurements here")
    parser.add_argument("--png", type=Path, help="draw the TOPS plot here")
    parser.add_argument("--plot", type=Path, help="only draw --png from this earlier --json")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--probe", action="store_true", help="also time the dense tilings of PROBE_CONFIGS (first shape)")
    parser.add_argument("--rows", default=",".join(map(str, ROWS)), help="the values of M to time")
    parser.add_argument("--merge", type=Path,
                        help="an earlier --json whose rows of the other M are kept (marked with its file name)")
    args = parser.parse_args()
    if args.plot:
        plot(json.loads(args.plot.read_text()), args.png)
        return
    result = measure(args.iters, args.probe, tuple(int(m) for m in args.rows.split(",")))
    if args.merge:
        result = merge(json.loads(args.merge.read_text()), result, args.merge.name)
    print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.png:
        plot(result, args.png)


def merge(earlier: dict, result: dict, source: str) -> dict:
    """``result`` plus the rows of ``earlier`` at the M it did not time, each marked ``from``."""
    timed = {r["M"] for r in result["rows"]}
    kept = [{**r, "from": r.get("from", source)} for r in earlier["rows"] if r["M"] not in timed]
    order = {label: i for i, (label, _, _) in enumerate(SHAPES)}
    rows = sorted(result["rows"] + kept, key=lambda r: (order[r["shape"]], r["M"]))
    return {**result, "rows": rows, "probes": result["probes"] or earlier.get("probes", [])}


def measure(iters: int, probe: bool = False, ms=ROWS) -> dict:
    import torch
    import tvm

    from tir_kernels.dense_gemm import PROBE_CONFIGS, DenseSpec, build_dense_kernel
    from tir_kernels.gemm_common import KernelSpec, build_kernels
    from tir_kernels.w4a4_gemm import linear_tiers

    specs = {(label, kind): KernelSpec(kind, ARCHS, N, K, G, O, False)
             for label, N, K in SHAPES for kind in ("linear", "gemm", "gemv")}
    # "": the tiling the target's variant gets (the table's columns); the others are probes.
    configs = ["", *PROBE_CONFIGS] if probe else [""]
    dense = {(label, op, config): DenseSpec(op, ARCHS, N, K, False, config)
             for i, (label, N, K) in enumerate(SHAPES) for op in ("fp16", "int8")
             for config in (configs if i == 0 else [""])}
    with tempfile.TemporaryDirectory() as tmp:
        libs = build_kernels(specs.values(), tmp)
        funcs = {key: tvm.runtime.load_module(libs[spec])[spec.function_name()] for key, spec in specs.items()}
        dense_libs = build_kernels(dense.values(), tmp, build=build_dense_kernel)
        dense_funcs = {key: tvm.runtime.load_module(dense_libs[spec])[spec.function_name()]
                       for key, spec in dense.items()}
    probes = []

    rows = []
    for label, N, K in SHAPES:
        weights = _rotating(lambda: _w4a4_weight(torch, N, K), ROTATE_BYTES)
        fp16_w = _rotating(lambda: torch.randn(N, K, device="cuda", dtype=torch.float16) * 0.02, ROTATE_BYTES)
        int8_w = _rotating(lambda: torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8), ROTATE_BYTES)
        sw = torch.rand(N, 1, device="cuda", dtype=torch.float16) * 0.001
        tvm_fp16_w = [tvm.runtime.from_dlpack(t) for t in fp16_w]
        tvm_int8_w = [tvm.runtime.from_dlpack(t) for t in int8_w]
        for M in ms:
            act = _w4a4_activation(torch, M, K)
            y = torch.empty(M, N, device="cuda", dtype=torch.float16)
            tvm_act = [tvm.runtime.from_dlpack(t) for t in act]
            tvm_w = [[tvm.runtime.from_dlpack(t) for t in w] for w in weights]
            tvm_y = tvm.runtime.from_dlpack(y)
            row = {"shape": label, "M": M, "N": N, "K": K, "O": O, "G": G}
            kinds = ("linear", "gemv", "gemm") if M <= SPLIT_ROWS else ("linear",)
            for kind in kinds:
                func = funcs[(label, kind)]
                row[f"{kind}_us"] = gpu_time(
                    torch, lambda i: func(*tvm_act[:4], *tvm_w[i % len(tvm_w)], tvm_y), iters)
            row["w4a4_us"] = row["linear_us"]
            if M in (16, 128):
                row["checked"] = check(torch, funcs[(label, "linear")], act, weights[0], N, K)
            x16 = torch.randn(M, K, device="cuda", dtype=torch.float16)
            row["fp16_us"] = gpu_time(torch, lambda i: torch.matmul(x16, fp16_w[i % len(fp16_w)].T), iters)
            x8 = torch.randint(-127, 128, (max(M, 32), K), device="cuda", dtype=torch.int8)
            row["int8_us"] = gpu_time(torch, lambda i: torch._int_mm(x8, int8_w[i % len(int8_w)].T), iters)
            row["int8_rows"] = max(M, 32)
            ops = 2 * M * N * K
            sx = torch.rand(M, 1, device="cuda", dtype=torch.float16) * 0.01
            dense_args = {"fp16": (tvm.runtime.from_dlpack(x16[:M]), tvm_fp16_w),
                          "int8": (tvm.runtime.from_dlpack(x8[:M].contiguous()), tvm_int8_w)}
            scales = [tvm.runtime.from_dlpack(t) for t in (sx, sw)]
            for (shape, op, config), func in dense_funcs.items():
                if shape != label:
                    continue
                x, ws = dense_args[op]
                if op == "fp16":
                    call = lambda i: func(x, ws[i % len(ws)], tvm_y)  # noqa: E731
                else:
                    call = lambda i: func(x, scales[0], ws[i % len(ws)], scales[1], tvm_y)  # noqa: E731
                us = gpu_time(torch, call, iters)
                if not config:
                    row[f"tvm_{op}_us"] = us
                    row[f"tvm_{op}_tops"] = ops / us / 1e6
                    row[f"tvm_{op}_vs_cublas"] = row[f"{op}_us"] / us
                else:
                    probes.append({"config": config, "op": op, "shape": label, "M": M, "us": us,
                                   "tops": ops / us / 1e6})
            for name in ("w4a4", "fp16", "int8"):
                row[f"{name}_tops"] = ops / row[f"{name}_us"] / 1e6
            row["vs_fp16"] = row["fp16_us"] / row["w4a4_us"]
            row["vs_int8"] = row["int8_us"] / row["w4a4_us"]
            row["weight_gbps"] = w4a4_weight_bytes(N, K) / row["w4a4_us"] / 1e3
            row["of_copy"] = row["weight_gbps"] / COPY_GBPS
            rows.append(row)
            print(f"{label:18s} M={M:5d} w4a4 {row['w4a4_us']:9.2f} us  fp16 {row['fp16_us']:9.2f} us"
                  f"  int8 {row['int8_us']:9.2f} us", flush=True)
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_gbps": COPY_GBPS,
            "G": G, "O": O,
            "linear_tiers": {label: [[m, cfg.name] for m, cfg in linear_tiers("sm90_wgmma", N)]
                             for label, N, _ in SHAPES},
            "dense_tiling": dense[(SHAPES[0][0], "fp16", "")].tiling(),
            "rows": rows,
            "probes": probes}


def w4a4_weight_bytes(N: int, K: int) -> int:
    """Bytes of one W4A4 weight: packed INT4, fp16 group scales, INT8 outliers, outlier scales."""
    normal = K - O
    return N * (normal // 2 + normal // G * 2 + O + 2)


def _w4a4_weight(torch, N: int, K: int):
    """Random codes over the full ranges and small fp16 scales, in the kernel's layouts."""
    normal = K - O
    return [torch.randint(0, 256, (N, normal // 2), device="cuda", dtype=torch.uint8),
            torch.rand(N, normal // G, device="cuda", dtype=torch.float16) * 0.01,
            torch.randint(-128, 128, (N, O), device="cuda", dtype=torch.int8),
            torch.rand(N, 1, device="cuda", dtype=torch.float16) * 0.001]


def _w4a4_activation(torch, M: int, K: int):
    return _w4a4_weight(torch, M, K)


def _rotating(make, total_bytes: int) -> list:
    """Enough copies of ``make()`` to span ``total_bytes``, so consecutive calls miss in L2."""
    first = make()
    tensors = first if isinstance(first, list) else [first]
    size = sum(t.numel() * t.element_size() for t in tensors)
    return [first] + [make() for _ in range(max(1, math.ceil(total_bytes / size)) - 1)]


def gpu_time(torch, call, iters: int) -> float:
    """Mean GPU time per call in microseconds: the profiler's kernel durations, summed."""
    from torch.profiler import ProfilerActivity, profile

    for i in range(3):
        call(i)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(iters):
            call(i)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA" and not e.name.startswith("Memcpy")]
    if not kernels:
        raise RuntimeError("the profiler saw no kernels (CUPTI unavailable?)")
    return sum(e.device_time for e in kernels) / iters


def check(torch, func, act, weight, N: int, K: int) -> bool:
    """The timed kernel's output equals the fused reference (one M per shape)."""
    import tvm

    from tir_kernels.w4a4_gemm import w4a4_gemm_reference

    y = torch.empty(act[0].shape[0], N, device="cuda", dtype=torch.float16)
    func(*[tvm.runtime.from_dlpack(t) for t in act + weight], tvm.runtime.from_dlpack(y))
    host = [t.cpu().numpy() for t in act + weight]
    ref = w4a4_gemm_reference(*host, G, fused=True)
    return bool(np.array_equal(y.cpu().numpy().view(np.uint16), ref.view(np.uint16)))


def print_table(result: dict) -> None:
    print(f"\n{result['device']}  (TOPS = 2MNK / time; W4A4 G={result['G']}, O={result['O']})")
    print("| shape | M | W4A4 us | fp16 us | int8 us | W4A4 TOPS | fp16 TFLOPS | int8 TOPS "
          "| vs fp16 | vs int8 | W4A4 weight GB/s | of copy BW |")
    print("|" + "---|" * 12)
    for r in result["rows"]:
        print(f"| {r['shape']} | {r['M']} | {r['w4a4_us']:.1f} | {r['fp16_us']:.1f} | {r['int8_us']:.1f} "
              f"| {r['w4a4_tops']:.0f} | {r['fp16_tops']:.0f} | {r['int8_tops']:.0f} "
              f"| {r['vs_fp16']:.2f}x | {r['vs_int8']:.2f}x | {r['weight_gbps']:.0f} | {r['of_copy']:.0%} |")
    print(f"\nDense baselines (tir_kernels.dense_gemm, {result.get('dense_tiling', 'sm80')} tiling) against cuBLAS")
    print("| shape | M | TVM fp16 us | TVM fp16 TFLOPS | of cuBLAS fp16 | TVM int8 us | TVM int8 TOPS | of cuBLAS int8 |")
    print("|" + "---|" * 8)
    for r in result["rows"]:
        print(f"| {r['shape']} | {r['M']} | {r['tvm_fp16_us']:.1f} | {r['tvm_fp16_tops']:.0f} "
              f"| {r['tvm_fp16_vs_cublas']:.0%} | {r['tvm_int8_us']:.1f} | {r['tvm_int8_tops']:.0f} "
              f"| {r['tvm_int8_vs_cublas']:.0%} |")
    split = [r for r in result["rows"] if "gemv_us" in r and "linear_us" in r]
    if split:
        print("\nW4A4 kernels alone; w4a4_linear's kernels by M:")
        for shape, tiers in result["linear_tiers"].items():
            print(f"  {shape}: " + ", ".join(f"{name} to M = {m}" if m else f"{name} above" for m, name in tiers))
        print("| shape | M | linear us | gemv us | gemm us |")
        print("|" + "---|" * 5)
        for r in split:
            print(f"| {r['shape']} | {r['M']} | {r['linear_us']:.1f} | {r['gemv_us']:.1f} | {r['gemm_us']:.1f} |")
    for p in result.get("probes", []):
        print(f"probe {p['config']:8s} {p['op']} {p['shape']} M={p['M']}: {p['us']:.1f} us, {p['tops']:.0f} TOPS")


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in result["rows"]))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), sharey=True)
    tiling = result.get("dense_tiling", "sm80")  # JSONs from before the sm90a variant have none
    for ax, shape in zip(np.atleast_1d(axes), shapes):
        rows = [r for r in result["rows"] if r["shape"] == shape]
        ms = [r["M"] for r in rows]
        for key, label, style in (("w4a4", "W4A4 (TVM: gemv, then wgmma s8)", "-"), ("fp16", "cuBLAS fp16", "-"),
                                  ("int8", "cuBLAS int8", "-"), ("tvm_fp16", f"fp16 (TVM, {tiling})", "--"),
                                  ("tvm_int8", f"W8A8 int8 (TVM, {tiling})", "--")):
            if f"{key}_tops" in rows[0]:
                ax.plot(ms, [r[f"{key}_tops"] for r in rows], style, marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{shape} (N={rows[0]['N']}, K={rows[0]['K']})")
        ax.set_xlabel("M (tokens)")
        ax.grid(True, which="both", alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("TOPS (2MNK / GPU time)")
    np.atleast_1d(axes)[0].legend()
    fig.suptitle(result["device"])
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=80)


if __name__ == "__main__":
    main()
