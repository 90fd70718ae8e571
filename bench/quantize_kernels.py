"""Memory bandwidth of the fused activation quantizers (tir_kernels/quantize.py) on a GPU.

Each kernel is memory bound: it reads the fp16 activation once and writes the Atom layout
(about a third of the bytes). The figure of merit is (bytes read + bytes written) / time, against
the device-to-device copy bandwidth measured on the same GPU (4238 GB/s on the H200,
shared/device/README.md). The reorder index, RMSNorm weight and the masked kernel's outlier index
and mask (a few KiB, cache resident) are not counted.

Timing: one build per kernel (M is dynamic), random non-zero inputs, several input/output sets
used in turn so that consecutive calls do not find their data in L2 (60 MB on the H200), a
warm-up, then two figures per row. ``gpu_us`` (what the bandwidth is computed from): the
kernel's GPU time from the CUDA profiler, as `bench/gemm.py` times (needs torch), median over
repeats of the mean over a batch of calls. ``wall_us``: wall-clock time per call of the same
batches between two device synchronizations, which also counts the Python launch path and the
gaps between launches (the only figure before session 8, and what the v1-v4 JSONs hold).

``floor_us``: the same figure for `traffic_floor`, a kernel that moves exactly a quantizer's
bytes (reads the row, writes the four outputs at the same addresses, one block per row) with no
arithmetic between: what this GPU's memory system allows for that traffic at that M, launch
ramp and drain included. ``pct_of_floor`` = floor_us / gpu_us says how much of the gap to the
copy bandwidth is the kernel's own.

    python bench/quantize_kernels.py --json $OUT/quantize_kernels_h200.json
    python bench/quantize_kernels.py --plot docs/bench/<that>.json --png docs/bench/<that>.png   # here

``--variant cpu`` runs the same measurement on the CPU build (a smoke test of this script).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import tvm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atom_tvm.quantization.formats import outlier_mask  # noqa: E402
from bench.gemm import gpu_time  # noqa: E402
from tir_kernels import quantize as qk  # noqa: E402

GROUP = 128
OUTLIERS = 128
CLIP = 0.9
EPS = 1e-6
L2_BYTES = 60 << 20
#: The label of `qk.outlier_mask_quantize`: o_proj's input in the masked-outlier layout, whose K is
#: the input width plus the O copied outlier channels.
MASKED = "outlier_mask_quantize (o_proj, masked)"


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _random_fp16(shape: tuple[int, ...], rng: np.random.Generator, block: np.ndarray) -> np.ndarray:
    """Random-looking fp16 data of any size fast: a random block tiled from a random offset."""
    size = math.prod(shape)
    start = int(rng.integers(0, block.size))
    return np.resize(np.roll(block, start), size).reshape(shape)


def measure_copy(dev, repeats: int) -> float:
    """Device-to-device copy bandwidth (bytes read + written) of a 1 GiB buffer, for reference."""
    n = 1 << 29
    src = tvm.runtime.tensor(np.ones(n, np.float16), dev)
    dst = tvm.runtime.tensor(np.empty(n, np.float16), dev)
    src.copyto(dst)
    times = []
    for _ in range(repeats):
        dev.sync()
        t0 = time.perf_counter()
        for _ in range(5):
            src.copyto(dst)
        dev.sync()
        times.append((time.perf_counter() - t0) / 5)
    return 2 * n * 2 / statistics.median(times) / 1e9


def traffic_floor(k: int, width: int):
    """``(x fp16 [M, width], q4, s4, q8, s8)`` for a layout of K = k channels (width = k; 2k for
    SiLU-mul's gate_up; k - O for the masked-outlier layout, whose INT8 block copies O of the row's
    channels): each of 256 threads per row loads its 16-byte chunks of the INT4 and outlier channels
    (and of the up half when width = 2k) and stores an XOR of their words where the quantizer stores
    that chunk's codes, a word's half as the group scale, another as the outlier scale. The masked
    layout's outlier stores take their words from the row's first chunks again, cache hits as the
    kernel's outlier gathers are, so only its ``width`` channels are read from memory."""
    from tvm.script import tirx as T

    threads, vec = 256, qk.VEC
    normal, n_out = k - OUTLIERS, OUTLIERS
    q_chunks, o_chunks = normal // vec, n_out // vec
    steps = -(-q_chunks // threads)
    group_lanes = GROUP // vec
    up = width == 2 * k
    outlier_chunk0 = 0 if width == normal else q_chunks  # where the outliers' source chunks start

    def _as_half(word):
        return T.reinterpret("float16", T.Cast("uint16", word))

    @T.prim_func
    def floor(x_h: T.handle, q4_h: T.handle, s4_h: T.handle, q8_h: T.handle, s8_h: T.handle):
        T.func_attr({"tirx.noalias": True, "global_symbol": f"traffic_floor_k{k}_w{width}"})
        M = T.int64()
        X = T.match_buffer(x_h, (M, width), "float16")
        Q4 = T.match_buffer(q4_h, (M, normal // 2), "uint8")
        S4 = T.match_buffer(s4_h, (M, normal // GROUP), "float16")
        Q8 = T.match_buffer(q8_h, (M, n_out), "int8")
        S8 = T.match_buffer(s8_h, (M, 1), "float16")
        Xw = T.decl_buffer((M, width // 2), "uint32", data=X.data)
        Q4w = T.decl_buffer((M, normal // 8), "uint32", data=Q4.data)
        Q8w = T.decl_buffer((M, n_out // 4), "uint32", data=Q8.data)
        row = T.launch_thread("blockIdx.x", M)
        tx = T.launch_thread("threadIdx.x", threads)
        words = T.alloc_local((4,), "uint32")
        for step in T.unroll(steps + 1):
            chunk = tx + step * threads  # INT4 chunks, then (past the last step) outlier chunks
            if (step < steps and chunk < q_chunks) or (step == steps and tx < o_chunks):
                c = T.if_then_else(step < steps, chunk, outlier_chunk0 + tx)
                for e in T.vectorized(4):
                    words[e] = Xw[row, c * 4 + e]
                if up:
                    for e in T.unroll(4):
                        words[e] = words[e] ^ Xw[row, k // 2 + c * 4 + e]
                words[0] = words[0] ^ words[1] ^ words[2] ^ words[3]
                if step < steps:
                    Q4w[row, chunk] = words[0]
                    if chunk % group_lanes == 0:
                        S4[row, chunk // group_lanes] = _as_half(words[1])
                else:
                    Q8w[row, 2 * tx] = words[0]
                    Q8w[row, 2 * tx + 1] = words[1]
                    if tx == 0:
                        S8[row, 0] = _as_half(words[2])

    return floor


def time_calls(kernel, sets, calls: int, repeats: int, torch) -> tuple[float, float | None]:
    """(wall us, GPU us or None without torch) per call: medians over ``repeats`` batches of
    ``calls`` back-to-back calls on the argument sets in turn, after one warm-up call on each."""
    dev = sets[0][0].device
    for args_ in sets:  # warm-up: module load, first-touch
        kernel(*args_)
    dev.sync()
    walls, gpus = [], []
    for _ in range(repeats):
        dev.sync()
        t0 = time.perf_counter()
        for c in range(calls):
            kernel(*sets[c % len(sets)])
        dev.sync()
        walls.append((time.perf_counter() - t0) / calls * 1e6)
        if torch is not None:
            gpus.append(gpu_time(torch, lambda c: kernel(*sets[c % len(sets)]), calls))
    return statistics.median(walls), statistics.median(gpus) if gpus else None


def cases(hidden: list[int], intermediate: list[int]):
    """(label, PrimFunc-maker, channels K, input width) for every kernel and size."""
    for h in hidden:
        yield ("rmsnorm_quantize", lambda v, h=h: qk.rmsnorm_quantize(h, GROUP, OUTLIERS, CLIP, EPS, v), h, h)
        yield ("rmsnorm_reorder_quantize", lambda v, h=h: qk.rmsnorm_reorder_quantize(
            h, GROUP, OUTLIERS, CLIP, EPS, v), h, h)
        yield ("reorder_quantize", lambda v, h=h: qk.reorder_quantize(h, GROUP, OUTLIERS, CLIP, v), h, h)
        yield (MASKED, lambda v, h=h: qk.outlier_mask_quantize(h, GROUP, OUTLIERS, CLIP, v), h + OUTLIERS, h)
    for i in intermediate:
        yield ("silu_mul_quantize", lambda v, i=i: qk.silu_mul_quantize(i, GROUP, OUTLIERS, CLIP, v),
               i, 2 * i)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=_ints, default=[4096, 8192, 16384], help="token counts M")
    parser.add_argument("--hidden", type=_ints, default=[4096], help="H of the rmsnorm/reorder kernels")
    parser.add_argument("--intermediate", type=_ints, default=[11008, 14336], help="I of silu_mul")
    parser.add_argument("--variant", choices=qk.VARIANTS, default="cuda")
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--copy-gbps", type=float, default=4238.0,
                        help="device-to-device copy bandwidth to compare with (H200: 4238)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--png", type=Path, default=None, help="draw %% of copy bandwidth against M here")
    parser.add_argument("--plot", type=Path, default=None,
                        help="measure nothing: print the table of this earlier --json (and draw --png)")
    args = parser.parse_args()
    if args.plot:
        result = json.loads(args.plot.read_text())
    else:
        result = measure(args)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1) + "\n")
    print_table(result)
    if args.png:
        plot(result, args.png)
    return 0


def measure(args) -> dict:
    """Build every case's kernel (and traffic floor), time each at each M; the JSON document."""

    dev = tvm.cuda(0) if args.variant == "cuda" else tvm.cpu(0)
    torch = None
    if args.variant == "cuda":
        try:
            import torch
        except ImportError:
            print("torch is not installed: timing by wall clock only (launch gaps included)", flush=True)
    archs = ()
    if args.variant == "cuda":
        major, minor = dev.compute_version.split(".")
        arch = f"sm_{major}{minor}"
        archs = ("sm_90a" if arch == "sm_90" else arch,)

    all_cases = list(cases(args.hidden, args.intermediate))
    funcs = [make(args.variant) for _, make, _, _ in all_cases]
    floors = {}
    if args.variant == "cuda":
        floors = {(k, width): traffic_floor(k, width) for _, _, k, width in all_cases}
    start = time.perf_counter()
    # One module: one nvcc run for every kernel.
    exe = qk.build(tvm.IRModule({f.attrs["global_symbol"]: f for f in [*funcs, *floors.values()]}),
                   args.variant, archs)
    print(f"built {len(funcs)} kernels for {args.variant} {' '.join(archs)} in "
          f"{time.perf_counter() - start:.1f} s", flush=True)

    copy_gbps = measure_copy(dev, args.repeats) if args.variant == "cuda" else None
    if copy_gbps:
        print(f"device-to-device copy, 1 GiB: {copy_gbps:.0f} GB/s (read + write)", flush=True)

    rng = np.random.default_rng(0)
    block = (rng.standard_normal(1 << 22) * 2).astype(np.float16)
    results = []
    floor_times = {}  # (k, width, rows) -> (wall_us, gpu_us) of the traffic floor
    for (label, _, k, width), func in zip(all_cases, funcs):
        kernel = exe[func.attrs["global_symbol"]]
        consts = []
        if label.startswith("rmsnorm"):
            consts.append((1 + 0.1 * rng.standard_normal(k)).astype(np.float16))
        if label in ("rmsnorm_reorder_quantize", "reorder_quantize"):
            consts.append(rng.permutation(k).astype(np.int32))
        if label == MASKED:
            outliers = rng.choice(width, OUTLIERS, replace=False).astype(np.int32)
            consts += [outliers, outlier_mask(outliers, width)]
        consts = [tvm.runtime.tensor(c, dev) for c in consts]
        for rows in args.rows:
            shapes = qk.output_shapes(rows, k, GROUP, OUTLIERS)
            bytes_in = rows * width * 2
            bytes_out = sum(math.prod(s) * np.dtype(d).itemsize for s, d in shapes)
            moved = bytes_in + bytes_out
            n_sets = max(2, min(8, math.ceil(3 * L2_BYTES / moved)))
            sets = []
            for _ in range(n_sets):
                x = tvm.runtime.tensor(_random_fp16((rows, width), rng, block), dev)
                outs = [tvm.runtime.tensor(np.empty(s, d), dev) for s, d in shapes]
                sets.append([x, *consts, *outs])
            calls = max(n_sets, 20)
            wall_us, gpu_us = time_calls(kernel, sets, calls, args.repeats, torch)
            floor_us = None
            if (k, width) in floors:
                if (k, width, rows) not in floor_times:
                    floor = exe[floors[k, width].attrs["global_symbol"]]
                    floor_sets = [[st[0], *st[len(consts) + 1:]] for st in sets]  # no weight, index
                    floor_times[k, width, rows] = time_calls(floor, floor_sets, calls, args.repeats, torch)
                floor_us = floor_times[k, width, rows][1] or floor_times[k, width, rows][0]
            timed_us = gpu_us or wall_us
            gbps = moved / timed_us / 1e3
            results.append({
                "kernel": label, "rows": rows, "channels": k, "bytes_in": bytes_in,
                "bytes_out": bytes_out, "gpu_us": gpu_us and round(gpu_us, 2),
                "wall_us": round(wall_us, 2), "gbps": round(gbps, 1),
                "pct_of_copy": round(100 * gbps / args.copy_gbps, 1),
                "pct_of_measured_copy": copy_gbps and round(100 * gbps / copy_gbps, 1),
                "wall_pct_of_copy": round(100 * moved / wall_us / 1e3 / args.copy_gbps, 1),
                "floor_us": floor_us and round(floor_us, 2),
                "floor_pct_of_copy": floor_us and round(100 * moved / floor_us / 1e3 / args.copy_gbps, 1),
                "pct_of_floor": floor_us and round(100 * floor_us / timed_us, 1),
            })
            gpu = f"{gpu_us:.2f} us GPU, " if gpu_us else ""
            print(f"  {label} M={rows} K={k}: {gpu}{wall_us:.2f} us wall, {gbps:.0f} GB/s", flush=True)
            del sets

    return {
        "device": dev.device_name if args.variant == "cuda" else "cpu", "variant": args.variant,
        "archs": list(archs), "group_size": GROUP, "n_outliers": OUTLIERS, "clip": CLIP,
        "copy_gbps": args.copy_gbps, "measured_copy_gbps": copy_gbps and round(copy_gbps, 1),
        "repeats": args.repeats, "command": "python3 " + " ".join(sys.argv), "results": results,
    }


def print_table(result: dict) -> None:
    results = result["results"]
    copy = result["copy_gbps"]
    timing = "GPU time (profiler)" if results and results[0]["gpu_us"] else "wall time (no profiler)"
    print(f"\n{result['device']}; % of {copy:.0f} GB/s copy bandwidth (bytes in + bytes out), by {timing}")
    name = max([26] + [len(r["kernel"]) for r in results])
    print(f"{'kernel':<{name}} {'M':>6} {'K':>6} {'GPU us':>8} {'wall us':>8} {'GB/s':>7} {'% copy':>7} {'wall %':>7} "
          f"{'floor us':>8} {'floor %':>7} {'of floor':>8}")
    for r in results:
        gpu = f"{r['gpu_us']:>8.2f}" if r["gpu_us"] is not None else f"{'-':>8}"
        floor = (f"{r['floor_us']:>8.2f} {r['floor_pct_of_copy']:>6.1f}% {r['pct_of_floor']:>7.1f}%"
                 if r.get("floor_us") is not None else f"{'-':>8} {'-':>7} {'-':>8}")
        print(f"{r['kernel']:<{name}} {r['rows']:>6} {r['channels']:>6} {gpu} {r['wall_us']:>8.2f} "
              f"{r['gbps']:>7.0f} {r['pct_of_copy']:>6.1f}% {r['wall_pct_of_copy']:>6.1f}% {floor}")


def plot(result: dict, png: Path) -> None:
    """One panel per channel count: each kernel's bandwidth against M as % of the copy bandwidth
    measured in the run (else the --copy-gbps figure), its traffic floor dashed, the 70% target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    copy = result.get("measured_copy_gbps") or result["copy_gbps"]
    # decode rows (M <= 16) are latency, not bandwidth: left out unless there is nothing else
    rows = [r for r in result["results"] if r["rows"] > 16] or result["results"]
    channels = sorted({r["channels"] for r in rows})
    fig, axes = plt.subplots(1, len(channels), figsize=(4.5 * len(channels), 4), sharey=True, squeeze=False)
    for ax, k in zip(axes[0], channels):
        mine = [r for r in rows if r["channels"] == k]
        for label in dict.fromkeys(r["kernel"] for r in mine):
            line = [r for r in mine if r["kernel"] == label]
            ax.plot([r["rows"] for r in line], [r["gbps"] / copy * 100 for r in line], marker="o", label=label)
        floor = {r["rows"]: r for r in mine if r.get("floor_us")}
        if floor:
            ms = sorted(floor)
            ax.plot(ms, [(floor[m]["bytes_in"] + floor[m]["bytes_out"]) / floor[m]["floor_us"] / 1e3 / copy * 100
                         for m in ms], "k--", lw=1, label="traffic floor")
        ax.axhline(70, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"K = {k}")
        ax.set_xlabel("tokens M")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel(f"% of {copy:.0f} GB/s copy (bytes in + out)")
    fig.suptitle(f"{result['device']}: fused activation quantizers (G = {result['group_size']}, "
                 f"O = {result['n_outliers']})")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
