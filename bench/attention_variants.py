"""Compare versions of the INT4 tensor-core decode kernel: correctness and speed on one GPU.

    python bench/attention_variants.py OLD/kv_attention.py tir_kernels/kv_attention.py

Each argument is a copy of `tir_kernels/kv_attention.py` (an older commit's, or one with a
constant changed). For each, the INT4 cuda `decode` of 32/32 and 32/8 heads (D = 128) and 9/3
(D = 64) is built here (the full TVM is needed), checked against `attention_ref` on three random
batches of mixed lengths (the worst error as a fraction of the GPU tests' tolerance, which must
stay below 1), and timed like `bench/attention.py` (profiler GPU time, rotating page sets) at four
(B, L) points. The steps table of docs/bench/attention.md comes from runs of this script.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.attention import _page_tables, gpu_time, kv_bytes, page_pool  # noqa: E402

PAGE = 16
HEADS = [(32, 32, 128), (32, 8, 128), (9, 3, 64)]
CASES = ([1, 15, 16, 17, 33, 300, 1000, 4000], [64] * 300, [5, 1024, 16, 31] * 20)
POINTS = ((128, 1024), (256, 1024), (16, 4096), (64, 512))
HBM_GBPS = 4200


def load_version(path: str):
    spec = importlib.util.spec_from_file_location(f"kv_version_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_case(kva, hq: int, hkv: int, dim: int, lengths: list[int], seed: int):
    """INT4 pages of one layer holding random codes and (scale, zero) rows for sequences of
    ``lengths`` in shuffled pages, q, the float64 reference and the tests' tolerance."""
    rng = np.random.default_rng(seed)
    pages_per = [(n + PAGE - 1) // PAGE for n in lengths]
    num_pages = sum(pages_per) + 3
    indptr = np.concatenate([[0], np.cumsum(pages_per)]).astype(np.int32)
    indices = rng.permutation(num_pages).astype(np.int32)[:indptr[-1]]
    last = np.array([n - (p - 1) * PAGE for n, p in zip(lengths, pages_per)], np.int32)
    codes = rng.integers(0, 256, (1, num_pages, 2, hkv, PAGE, dim // 2), dtype=np.uint8)
    scale_zero = np.empty((1, num_pages, 2, hkv, PAGE, 2), np.float16)
    scale_zero[..., 0] = rng.uniform(0.01, 0.3, scale_zero.shape[:-1])
    scale_zero[..., 1] = rng.uniform(-2, 0, scale_zero.shape[:-1])
    q = rng.standard_normal((len(lengths), hq, dim)).astype(np.float16)
    ref = kva.attention_ref(q, np.arange(len(lengths) + 1, dtype=np.int32), (codes, scale_zero), 0,
                            indptr, indices, last, 4)
    v_max = np.abs(kva.dequantize_pages_ref((codes[0], scale_zero[0]), 4)[:, 1]).max()
    tol = 0.5 * np.spacing(np.abs(ref).astype(np.float16)).astype(np.float64) + 2.0**-16 * v_max
    return (q, codes, scale_zero, indptr, indices, last), ref, tol


def main() -> None:
    import torch
    import tvm

    from tir_kernels.quantize import build

    versions = sys.argv[1:]
    if not versions:
        raise SystemExit(__doc__)
    funcs = {}
    for i, path in enumerate(versions):
        kva = load_version(path)
        for hq, hkv, dim in HEADS:
            f = kva.decode(4, hq, hkv, dim, variant="cuda")
            funcs[(path, hq, hkv, dim)] = (kva, f.with_attr("global_symbol", f"{f.attrs['global_symbol']}_v{i}"))
    lib = build(tvm.IRModule({f.attrs["global_symbol"]: f for _, f in funcs.values()}), "cuda", ("sm_90a",))
    dev, dl = tvm.cuda(0), tvm.runtime.from_dlpack
    for (path, hq, hkv, dim), (kva, f) in funcs.items():
        run = lib[f.attrs["global_symbol"]]
        worst = 0.0
        for seed, lengths in enumerate(CASES):
            (q, *pages_and_table), ref, tol = random_case(kva, hq, hkv, dim, lengths, seed)
            codes, scale_zero, indptr, indices, last = pages_and_table
            out = tvm.runtime.tensor(np.zeros_like(q), dev)
            run(*[tvm.runtime.tensor(a, dev) for a in (q, codes, scale_zero)], 0,
                *[tvm.runtime.tensor(a, dev) for a in (indptr, indices, last)], out)
            worst = max(worst, float((np.abs(out.numpy().astype(np.float64) - ref) / tol).max()))
        print(f"{path} {hq}/{hkv} D={dim}: worst error / tolerance {worst:.3f}", flush=True)
    for (path, hq, hkv, dim), (kva, f) in funcs.items():
        if dim != 128:
            continue
        run = lib[f.attrs["global_symbol"]]
        for batch, ctx in POINTS:
            num_pages = batch * ctx // PAGE * 4
            codes, scale_zero = page_pool(torch, kva.page_shapes(1, 1, hkv, dim, 4, PAGE), 4, num_pages)
            q = torch.randn(batch, hq, dim, device="cuda", dtype=torch.float16)
            out = torch.empty_like(q)
            indptr, indices, last = _page_tables(torch, batch, ctx, num_pages,
                                                 kv_bytes(batch, ctx, hkv, dim, 4), seed=1)
            us = gpu_time(torch, lambda i: run(  # noqa: B023
                dl(q), dl(codes), dl(scale_zero), 0, dl(indptr), dl(indices[i % len(indices)]),  # noqa: B023
                dl(last), dl(out)), 10)  # noqa: B023
            gbps = (kv_bytes(batch, ctx, hkv, dim, 4) + 4 * q.numel()) / us / 1e3
            print(f"{path} {hq}/{hkv} B={batch} L={ctx}: {us:.1f} us, {gbps:.0f} GB/s "
                  f"({gbps / HBM_GBPS:.0%})", flush=True)


if __name__ == "__main__":
    main()
