"""GPU time of the cuda KV `append` (one block per new token) with its warps chosen by token count
(`kv_attention._APPEND_TIERS`) against the 4 warps it always had before session 10, at n new
tokens for three Llama head shapes, INT4 and FP16 pages; both variants' outputs compared bit for
bit with each other and, up to 512 tokens, with `rope_ref` / `write_pages_ref`.

    python bench/append_probe.py --json $OUT/append_tiers.json [--repeats 5]

Needs a GPU, torch (profiler GPU time, as bench/gemm.py) and TVM with its compiler.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tvm  # noqa: E402

from bench.gemm import gpu_time  # noqa: E402
from tir_kernels import kv_attention as kva  # noqa: E402
from tir_kernels.quantize import build  # noqa: E402

VARIANTS = {"4 warps": ((None, 4),), "by token count": kva._APPEND_TIERS}
SHAPES = {"llama2-13b": (40, 40, 128), "llama2-7b": (32, 32, 128), "llama3-8b": (32, 8, 128)}
TOKENS = (1, 8, 64, 128, 256, 257, 512, 1024, 1025, 4096)
THETA = 10000.0
P = kva.PAGE_SIZE


def kernel(variant: str, kv_bits: int, hq: int, hkv: int, d: int):
    saved = kva._APPEND_TIERS
    kva._APPEND_TIERS = VARIANTS[variant]
    try:
        func = kva.append(kv_bits, hq, hkv, d, THETA, variant="cuda")
    finally:
        kva._APPEND_TIERS = saved
    tag = variant.replace(" ", "_")
    return func.with_attr("global_symbol", f"{func.attrs['global_symbol']}_{tag}")


def same_bits(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(np.array_equal(np.ascontiguousarray(x).view(np.uint8), np.ascontiguousarray(y).view(np.uint8))
               for x, y in zip(a, b))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import torch

    dev = tvm.cuda(0)
    major, minor = dev.compute_version.split(".")
    arch = "sm_90a" if (major, minor) == ("9", "0") else f"sm_{major}{minor}"
    report = {"device": dev.device_name, "checks": [], "timings": [], "command": "python " + " ".join(sys.argv)}
    funcs = {(v, b, s): kernel(v, b, *SHAPES[s]) for v in VARIANTS for b in (4, 16) for s in SHAPES}
    exe = build(tvm.IRModule({f.attrs["global_symbol"]: f for f in funcs.values()}), "cuda", (arch,))
    rng = np.random.default_rng(5)
    ok = True
    for shape, (hq, hkv, d) in SHAPES.items():
        for kv_bits in (4, 16):
            for n in TOKENS:
                num_pages = n // P + 8
                qkv = (rng.standard_normal((n, hq + 2 * hkv, d)) * rng.uniform(0.1, 4, (n, 1, 1))).astype(np.float16)
                pos = rng.integers(0, 8000, n).astype(np.int32)
                slots = rng.permutation(num_pages * P)[:n].astype(np.int32)
                empty = [np.zeros(s, t) for s, t in kva.page_shapes(1, num_pages, hkv, d, kv_bits, P)]
                outs, line = {}, []
                for variant in VARIANTS:
                    pages = [tvm.runtime.tensor(p, dev) for p in empty]
                    q_rot = tvm.runtime.tensor(np.zeros((n, hq, d), np.float16), dev)
                    inputs = [tvm.runtime.tensor(a, dev) for a in (qkv, pos, slots)]
                    fn = exe[funcs[(variant, kv_bits, shape)].attrs["global_symbol"]]
                    fn(*inputs, *pages, 0, q_rot)
                    outs[variant] = [q_rot.numpy()] + [p.numpy() for p in pages]
                    us = statistics.median(gpu_time(torch, lambda c: fn(*inputs, *pages, 0, q_rot), 20)
                                           for _ in range(args.repeats))
                    report["timings"].append({"shape": shape, "kv_bits": kv_bits, "n": n, "variant": variant,
                                              "gpu_us": round(us, 2)})
                    line.append(f"{variant} {us:7.2f}")
                exact = same_bits(outs["4 warps"], outs["by token count"])
                if n <= 512:
                    q_ref = kva.rope_ref(qkv[:, :hq], pos, THETA)
                    k_ref = kva.rope_ref(qkv[:, hq:hq + hkv], pos, THETA)
                    pages_ref = kva.write_pages_ref(tuple(empty), 0, slots, k_ref, qkv[:, hq + hkv:], kv_bits)
                    exact &= same_bits(outs["by token count"], [q_ref, *pages_ref])
                ok &= exact
                report["checks"].append({"shape": shape, "kv_bits": kv_bits, "n": n, "exact": exact})
                print(f"{shape:11s} int{kv_bits:<2d} n={n:5d}: " + " | ".join(line) + ("" if exact else "  MISMATCH"),
                      flush=True)
    report["all_exact"] = ok
    print("bit-exact:", ok, flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
