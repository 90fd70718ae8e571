"""GPU probe (not committed): the in-order RMSNorm quantizer (one residual order, identity index)
against the committed rmsnorm_reorder_quantize: bit-exact check, then GPU time.

    python bench/quant_inorder/probe.py --json $OUT/quant_inorder.json
"""
from __future__ import annotations

import argparse, json, math, statistics, sys, time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import tvm  # noqa: E402

from bench.quant_inorder.inorder import inorder_rmsnorm_quantize  # noqa: E402
from bench.quantize_kernels import L2_BYTES, _random_fp16, measure_copy  # noqa: E402
from tests.test_quantize_kernels import make_inputs  # noqa: E402
from tir_kernels import quantize as qk  # noqa: E402

CLIP, EPS = 0.9, 1e-5


def outs_for(rows, k, g, o, dev, poison=False):
    outs = []
    for shape, dtype in qk.output_shapes(rows, k, g, o):
        if poison:
            integer = dtype in ("uint8", "int8")
            a = np.full(shape, 0x7B, np.uint8).view(dtype) if integer else np.full(shape, np.nan, dtype)
        else:
            a = np.empty(shape, dtype)
        outs.append(tvm.runtime.tensor(a, dev))
    return outs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    dev = tvm.cuda(0)
    report = {"device": dev.device_name, "checks": [], "timings": [],
              "command": "python " + " ".join(sys.argv)}
    dump = lambda: args.json and args.json.write_text(json.dumps(report, indent=1) + "\n")
    shapes = [(576, 64, 128), (576, 64, 0), (4096, 128, 128), (5120, 128, 128), (14336, 128, 128)]
    funcs = {}
    for k, g, o in shapes:
        funcs[("inorder", k, g, o)] = inorder_rmsnorm_quantize(k, g, o, CLIP, EPS)
        if g == 128:
            funcs[("staged", k, g, o)] = qk.rmsnorm_reorder_quantize(k, g, o, CLIP, EPS, "cuda")
    mods = {}
    for key, f in funcs.items():
        mods[f.attrs["global_symbol"]] = f
    t0 = time.perf_counter()
    exe = qk.build(tvm.IRModule(mods), "cuda", ("sm_90a",))
    print(dev.device_name, "built in", round(time.perf_counter() - t0, 1), flush=True)
    fn = lambda key: exe[funcs[key].attrs["global_symbol"]]
    rng = np.random.default_rng(3)
    ok = True
    for k, g, o in shapes:
        for rows in (1, 7, 33, 2500):
            inp = make_inputs("rmsnorm", rows, k, g, rng)
            ident = np.arange(k, dtype=np.int32)
            ref = qk.rmsnorm_reorder_quantize_ref(inp["x"], inp["weight"], ident, g, o, CLIP, EPS)
            outs = outs_for(rows, k, g, o, dev, poison=True)
            f = inorder_rmsnorm_quantize(k, g, o, CLIP, EPS)
            exe[f.attrs["global_symbol"]](tvm.runtime.tensor(inp["x"], dev),
                                          tvm.runtime.tensor(inp["weight"], dev), *outs)
            got = [t.numpy() for t in outs]
            bytes_ = lambda t: np.ascontiguousarray(t).view(np.uint8)
            d = {n: int((bytes_(a) != bytes_(b)).sum())
                 for n, a, b in zip(("q4", "s4", "q8", "s8"), got, [ref.q4, ref.s4, ref.q8, ref.s8])}
            good = not any(d.values())
            ok &= good
            report["checks"].append({"K": k, "G": g, "O": o, "rows": rows, "exact": good, "diff": d})
            if not good:
                print("MISMATCH", k, g, o, rows, d, flush=True)
    report["all_exact"] = ok
    print("bit-exact:", ok, len(report["checks"]), flush=True)
    dump()
    import torch
    from bench.gemm import gpu_time
    copy = measure_copy(dev, 7)
    report["copy_gbps"] = round(copy, 1)
    block = (rng.standard_normal(1 << 22) * 2).astype(np.float16)
    for k, rows_list in ((4096, (1, 16, 1024, 4096, 8192, 16384)), (5120, (1, 4096, 16384))):
        w = tvm.runtime.tensor((1 + 0.1 * rng.standard_normal(k)).astype(np.float16), dev)
        idx = tvm.runtime.tensor(rng.permutation(k).astype(np.int32), dev)
        for rows in rows_list:
            shapes_ = qk.output_shapes(rows, k, 128, 128)
            moved = rows * k * 2 + sum(math.prod(s) * np.dtype(d).itemsize for s, d in shapes_)
            n_sets = max(2, min(8, math.ceil(3 * L2_BYTES / moved)))
            sets = [(tvm.runtime.tensor(_random_fp16((rows, k), rng, block), dev),
                     outs_for(rows, k, 128, 128, dev)) for _ in range(n_sets)]
            calls = max(n_sets, 20)
            staged, inorder = fn(("staged", k, 128, 128)), fn(("inorder", k, 128, 128))
            kern = {"staged": lambda c, s=sets: staged(s[c % n_sets][0], w, idx, *s[c % n_sets][1]),
                    "inorder": lambda c, s=sets: inorder(s[c % n_sets][0], w, *s[c % n_sets][1])}
            for call in kern.values():
                for c in range(n_sets):
                    call(c)
            dev.sync()
            times = {n: [] for n in kern}
            for _ in range(args.repeats):
                for n, call in kern.items():
                    times[n].append(gpu_time(torch, call, calls))
            line = []
            for n in kern:
                us = statistics.median(times[n])
                pct = 100 * moved / us / 1e3 / copy
                report["timings"].append({"kernel": n, "K": k, "rows": rows, "gpu_us": round(us, 2),
                                          "pct_of_copy": round(pct, 1),
                                          "pct_of_4238": round(100 * moved / us / 1e3 / 4238, 1)})
                line.append(f"{n} {us:7.2f} us ({pct:5.1f}% of copy)")
            print(f"K={k} M={rows:6d}: " + " | ".join(line), flush=True)
            del sets
            dump()
    print(f"copy {copy:.0f} GB/s", flush=True)
    dump()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
