"""Benchmark paged decode attention over INT4 / INT8 / FP16 KV pages against TVM's own FP16 kernel.

    python bench/attention.py --build build/attention_bench          # here: no GPU, needs nvcc
    python bench/attention.py --lib build/attention_bench --json docs/bench/attention_h200.json \\
        --png docs/bench/attention_h200.png                           # GPU host, runtime-only TVM
    python bench/attention.py --plot docs/bench/attention_h200.json --png docs/bench/attention_h200.png

The first form compiles every kernel (ours from `tir_kernels.kv_attention`, TVM's
``batch_decode_paged_kv`` from `tvm.relax.frontend.nn.llm.kv_cache`) for sm_90a into one library
plus a manifest, so the GPU host needs only the TVM runtime and torch. Without ``--lib`` the
second form builds them there first.

What is timed: one decode attention call of one layer over a batch of B sequences of L cached
tokens each (16-token pages in shuffled order), Llama-2-7B's head shape (32 query heads, 32 KV
heads, D = 128) and a GQA 32/8 set. GPU time from the CUDA profiler, summed over the kernels a
call launches (ours: the split-K kernel and its merge), so Python launch overhead does not count.
Consecutive calls read disjoint page sets (at least 256 MiB apart in total), so the 60 MB L2
does not serve a small case from cache. TVM's kernel reads the same FP16 page buffer through
the same page table (its page layout is our FP16 layout of one layer). Bytes: the K/V codes and
(scale, zero) pairs of every cached token, q and the output (TVM's: plus its lse output).
Also one prefill line: our cuda prefill on 8 fresh 512-token prompts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gemm import gpu_time  # noqa: E402

#: (query heads, KV heads, head_dim): Llama-2-7B and a GQA group of 4.
HEADS = [(32, 32, 128), (32, 8, 128)]
BATCHES = (1, 16, 64, 128, 256)
CONTEXTS = (512, 1024, 4096)
KV_BITS = (4, 8, 16)
NAMES = {4: "int4", 8: "int8", 16: "fp16"}
PAGE = 16
ARCH = "sm_90a"
#: HBM bandwidth the targets are stated against (H200).
HBM_GBPS = 4200
ROTATE_BYTES = 256 << 20
PREFILL_PROMPTS, PREFILL_TOKENS = 8, 512


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", type=Path, help="only compile the kernels into this directory")
    parser.add_argument("--lib", type=Path, help="directory of an earlier --build")
    parser.add_argument("--json", type=Path, help="write the measurements here")
    parser.add_argument("--png", type=Path, help="draw the bandwidth plot here")
    parser.add_argument("--plot", type=Path, help="only draw --png from this earlier --json")
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    if args.plot:
        plot(json.loads(args.plot.read_text()), args.png)
        return
    if args.build:
        build(args.build)
        return
    if args.lib is None:
        import tempfile

        args.lib = Path(tempfile.mkdtemp())
        build(args.lib)
    result = measure(args.lib, args.iters)
    print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.png:
        plot(result, args.png)


def _key(kind: str, hq: int, hkv: int, bits: int = 16) -> str:
    return f"{kind}/{hq}/{hkv}/{bits}"


def build(out: Path) -> None:
    """Every benchmarked kernel in ``out/kernels.so``; ``out/manifest.json`` maps each
    (kind, heads, bits) to its function name and one page's buffer shapes."""
    import tvm
    from tvm.relax.frontend.nn.llm.kv_cache import _attention_decode

    from tir_kernels import kv_attention as kva
    from tir_kernels.quantize import build as build_kernel

    funcs, manifest = {}, {"functions": {}, "page_shapes": {}}
    target = tvm.target.Target({"kind": "cuda", "arch": ARCH})
    for hq, hkv, dim in HEADS:
        for bits in KV_BITS:
            kinds = [("decode", kva.decode)] + ([("prefill", kva.prefill)] if hkv == hq else [])
            for kind, make in kinds:
                func = make(bits, hq, hkv, dim, PAGE, variant="cuda")
                funcs[func.attrs["global_symbol"]] = func
                manifest["functions"][_key(kind, hq, hkv, bits)] = func.attrs["global_symbol"]
            manifest["page_shapes"][_key("pages", hq, hkv, bits)] = [
                [list(shape), dtype] for shape, dtype in kva.page_shapes(1, 1, hkv, dim, bits, PAGE)]
        name = f"tvm_batch_decode_paged_kv_q{hq}_kv{hkv}"
        funcs[name] = _attention_decode(hkv, hq, dim, "float16", False, {}, target, PAGE).with_attr(
            "global_symbol", name)
        manifest["functions"][_key("tvm_decode", hq, hkv)] = name
    out.mkdir(parents=True, exist_ok=True)
    build_kernel(tvm.IRModule(funcs), "cuda", (ARCH,)).export_library(str(out / "kernels.so"))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"built {len(funcs)} kernels into {out}")


def _pools(torch, manifest: dict, hq: int, hkv: int, num_pages: int) -> dict:
    """Random page buffers of ``num_pages`` pages for each KV width (one layer)."""
    return {bits: page_pool(torch, manifest["page_shapes"][_key("pages", hq, hkv, bits)], bits, num_pages)
            for bits in KV_BITS}


def page_pool(torch, page_shapes, bits: int, num_pages: int) -> list:
    """Random page buffers of one KV width: ``page_shapes`` as `kv_attention.page_shapes` of one
    layer (any page count), resized to ``num_pages`` pages."""
    tensors = []
    for shape, dtype in page_shapes:
        shape = (shape[0], num_pages, *shape[2:])
        if dtype == "uint8":
            tensors.append(torch.randint(0, 256, shape, device="cuda", dtype=torch.uint8))
        elif bits == 16:
            tensors.append(torch.randn(shape, device="cuda", dtype=torch.float16))
        else:  # (scale, zero) pairs of rows within about [-1, 1]
            pair = torch.empty(shape, device="cuda", dtype=torch.float16)
            pair[..., 0].uniform_(0.001, 0.13)
            pair[..., 1].uniform_(-1, 0)
            tensors.append(pair)
    return tensors


def _page_tables(torch, batch: int, ctx: int, num_pages: int, bytes_per_call: int, seed: int):
    """Page tables of consecutive calls, each over its own shuffled block of pages."""
    per_call = batch * ctx // PAGE
    calls = max(1, min(num_pages // per_call, -(-ROTATE_BYTES // bytes_per_call)))
    rng = np.random.default_rng(seed)
    indptr = torch.arange(0, per_call + 1, ctx // PAGE, device="cuda", dtype=torch.int32)
    last = torch.full((batch,), PAGE, device="cuda", dtype=torch.int32)
    indices = [torch.from_numpy((rng.permutation(per_call) + i * per_call).astype(np.int32)).cuda()
               for i in range(calls)]
    return indptr, indices, last


def kv_bytes(batch: int, ctx: int, hkv: int, dim: int, bits: int) -> int:
    """Bytes of the cached K and V a decode call reads: codes plus (scale, zero) per row."""
    row = dim * bits // 8 + (4 if bits != 16 else 0)
    return batch * ctx * 2 * hkv * row


def measure(lib: Path, iters: int) -> dict:
    import torch
    import tvm

    manifest = json.loads((lib / "manifest.json").read_text())
    mod = tvm.runtime.load_module(str(lib / "kernels.so"))
    fn = {key: mod[name] for key, name in manifest["functions"].items()}
    dl = tvm.runtime.from_dlpack
    rows, checks = [], []
    for hq, hkv, dim in HEADS:
        num_pages = max(BATCHES) * max(CONTEXTS) // PAGE
        pools = _pools(torch, manifest, hq, hkv, num_pages)
        tvm_pools = {bits: [dl(t) for t in ts] for bits, ts in pools.items()}
        # TVM's kernel takes one layer's pages: our FP16 buffer without its layer axis.
        tvm_pages = dl(pools[16][0][0])
        for batch in BATCHES:
            q = torch.randn(batch, hq, dim, device="cuda", dtype=torch.float16)
            out = torch.empty_like(q)
            lse = torch.empty(batch, hq, device="cuda", dtype=torch.float32)
            zeros = torch.zeros(batch, device="cuda", dtype=torch.int32)
            io_bytes = 2 * q.numel() * 2
            for ctx in CONTEXTS:
                row = {"heads": f"{hq}/{hkv}", "hq": hq, "hkv": hkv, "D": dim, "B": batch, "L": ctx}
                small = kv_bytes(batch, ctx, hkv, dim, 4)
                indptr, indices, last = _page_tables(torch, batch, ctx, num_pages, small, seed=batch + ctx)
                table = [dl(indptr), [dl(i) for i in indices], dl(last)]
                args = [dl(q), dl(out)]
                for bits in KV_BITS:
                    decode = fn[_key("decode", hq, hkv, bits)]
                    pages = tvm_pools[bits]
                    us = gpu_time(torch, lambda i: decode(  # noqa: B023
                        args[0], *pages, 0, table[0], table[1][i % len(table[1])], table[2], args[1]), iters)
                    nbytes = kv_bytes(batch, ctx, hkv, dim, bits) + io_bytes
                    row[f"{NAMES[bits]}_us"] = us
                    row[f"{NAMES[bits]}_gbps"] = nbytes / us / 1e3
                tvm_decode = fn[_key("tvm_decode", hq, hkv)]
                tvm_args = [dl(lse), dl(zeros)]
                sm_scale = 1 / np.sqrt(dim)
                us = gpu_time(torch, lambda i: tvm_decode(  # noqa: B023
                    args[0], tvm_pages, table[0], table[1][i % len(table[1])], table[2], tvm_args[1],
                    tvm_args[1], args[1], tvm_args[0], 0, 1.0, 10000.0, sm_scale), iters)
                row["tvm_fp16_us"] = us
                row["tvm_fp16_gbps"] = (kv_bytes(batch, ctx, hkv, dim, 16) + io_bytes + lse.numel() * 4) / us / 1e3
                for name in (*NAMES.values(), "tvm_fp16"):
                    row[f"{name}_of_hbm"] = row[f"{name}_gbps"] / HBM_GBPS
                row["int4_vs_fp16"] = row["fp16_us"] / row["int4_us"]
                row["int4_vs_tvm_fp16"] = row["tvm_fp16_us"] / row["int4_us"]
                row["fp16_vs_tvm_fp16"] = row["tvm_fp16_us"] / row["fp16_us"]
                rows.append(row)
                print(f"{hq}/{hkv} B={batch:3d} L={ctx:4d}  int4 {row['int4_us']:8.1f} us "
                      f"({row['int4_of_hbm']:.0%})  int8 {row['int8_us']:8.1f}  fp16 {row['fp16_us']:8.1f}  "
                      f"tvm fp16 {row['tvm_fp16_us']:8.1f}", flush=True)
                if batch == 16 and ctx == 1024:
                    checks.append(_check_against_tvm(fn, hq, hkv, tvm_pools[16], tvm_pages, q, table, dl))
        pools = tvm_pools = tvm_pages = None
        torch.cuda.empty_cache()
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "hbm_gbps": HBM_GBPS,
            "page_size": PAGE, "rows": rows, "checks": checks, "prefill": measure_prefill(torch, fn, manifest, iters)}


def _check_against_tvm(fn, hq, hkv, pages, tvm_pages, q, table, dl) -> dict:
    """Our FP16 decode and TVM's on the same pages and table: they compute the same attention."""
    import torch

    ours, theirs = torch.empty_like(q), torch.empty_like(q)
    lse = torch.empty(q.shape[:2], device="cuda", dtype=torch.float32)
    zeros = torch.zeros(q.shape[0], device="cuda", dtype=torch.int32)
    fn[_key("decode", hq, hkv, 16)](dl(q), *pages, 0, table[0], table[1][0], table[2], dl(ours))
    fn[_key("tvm_decode", hq, hkv)](dl(q), tvm_pages, table[0], table[1][0], table[2], dl(zeros), dl(zeros),
                                     dl(theirs), dl(lse), 0, 1.0, 10000.0, 1 / np.sqrt(q.shape[-1]))
    diff = (ours.float() - theirs.float()).abs().max().item()
    return {"heads": f"{hq}/{hkv}", "B": q.shape[0], "L": 1024, "max_abs_diff_ours_vs_tvm_fp16": diff,
            "max_abs_out": ours.float().abs().max().item()}


def measure_prefill(torch, fn, manifest: dict, iters: int) -> list[dict]:
    """Our cuda prefill on PREFILL_PROMPTS fresh prompts of PREFILL_TOKENS tokens (one layer)."""
    import tvm

    dl = tvm.runtime.from_dlpack
    hq, hkv, dim = HEADS[0]
    n = PREFILL_PROMPTS * PREFILL_TOKENS
    per_seq = PREFILL_TOKENS // PAGE
    q = torch.randn(n, hq, dim, device="cuda", dtype=torch.float16)
    out = torch.empty_like(q)
    qo = torch.arange(0, n + 1, PREFILL_TOKENS, device="cuda", dtype=torch.int32)
    indptr = torch.arange(0, PREFILL_PROMPTS * per_seq + 1, per_seq, device="cuda", dtype=torch.int32)
    indices = torch.arange(PREFILL_PROMPTS * per_seq, device="cuda", dtype=torch.int32)
    last = torch.full((PREFILL_PROMPTS,), PAGE, device="cuda", dtype=torch.int32)
    pools = _pools(torch, manifest, hq, hkv, PREFILL_PROMPTS * per_seq)
    args = [dl(t) for t in (q, qo, indptr, indices, last, out)]
    lines = []
    for bits in KV_BITS:
        prefill = fn[_key("prefill", hq, hkv, bits)]
        pages = [dl(t) for t in pools[bits]]
        us = gpu_time(torch, lambda i: prefill(*args[:2], *pages, 0, *args[2:]), iters)  # noqa: B023
        flops = 4 * PREFILL_PROMPTS * hq * dim * PREFILL_TOKENS * (PREFILL_TOKENS + 1) / 2
        lines.append({"kv_bits": bits, "heads": f"{hq}/{hkv}", "prompts": PREFILL_PROMPTS,
                      "tokens": PREFILL_TOKENS, "us": us, "tokens_per_s": n / us * 1e6,
                      "tflops": flops / us / 1e6})
        print(f"prefill {NAMES[bits]}: {us:.1f} us, {n / us * 1e6:,.0f} tokens/s, {flops / us / 1e6:.1f} TFLOPS",
              flush=True)
    return lines


def print_table(result: dict) -> None:
    print(f"\n{result['device']}: decode attention of one layer, GB/s on the bytes each kernel must read "
          f"(% of {result['hbm_gbps'] / 1000:.1f} TB/s)")
    print("| heads | B | L | INT4 us | INT8 us | FP16 us | TVM FP16 us | INT4 GB/s (% HBM) | INT8 GB/s (% HBM) "
          "| FP16 GB/s (% HBM) | TVM FP16 GB/s (% HBM) | INT4 vs our FP16 | INT4 vs TVM FP16 | our FP16 vs TVM |")
    print("|" + "---|" * 14)
    for r in result["rows"]:
        bw = " | ".join(f"{r[f'{k}_gbps']:.0f} ({r[f'{k}_of_hbm']:.0%})" for k in (*NAMES.values(), "tvm_fp16"))
        print(f"| {r['heads']} | {r['B']} | {r['L']} | {r['int4_us']:.1f} | {r['int8_us']:.1f} | {r['fp16_us']:.1f} "
              f"| {r['tvm_fp16_us']:.1f} | {bw} | {r['int4_vs_fp16']:.2f}x | {r['int4_vs_tvm_fp16']:.2f}x "
              f"| {r['fp16_vs_tvm_fp16']:.2f}x |")
    for c in result["checks"]:
        print(f"check {c['heads']} B={c['B']} L={c['L']}: our FP16 vs TVM FP16 max |diff| "
              f"{c['max_abs_diff_ours_vs_tvm_fp16']:.3g} (max |out| {c['max_abs_out']:.3g})")
    for p in result["prefill"]:
        print(f"prefill {p['heads']} {NAMES[p['kv_bits']]}: {p['prompts']} x {p['tokens']} tokens in {p['us']:.0f} us "
              f"= {p['tokens_per_s']:,.0f} tokens/s per layer ({p['tflops']:.1f} TFLOPS)")


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = sorted({r["L"] for r in result["rows"]})
    fig, axes = plt.subplots(1, len(contexts), figsize=(5 * len(contexts), 4), sharey=True)
    for ax, ctx in zip(np.atleast_1d(axes), contexts):
        for heads, style in (("32/32", "-"), ("32/8", "--")):
            rows = [r for r in result["rows"] if r["L"] == ctx and r["heads"] == heads]
            if not rows:
                continue
            for key, label in (("int4", "INT4 (ours)"), ("int8", "INT8 (ours)"), ("fp16", "FP16 (ours)"),
                               ("tvm_fp16", "FP16 (TVM)")):
                ax.plot([r["B"] for r in rows], [r[f"{key}_gbps"] for r in rows], style, marker="o",
                        label=f"{label} {heads}")
        ax.axhline(result["hbm_gbps"], color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"L = {ctx}")
        ax.set_xlabel("batch (sequences)")
        ax.grid(True, which="both", alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("GB/s of KV + q/out bytes")
    np.atleast_1d(axes)[-1].legend(fontsize=7)
    fig.suptitle(f"{result['device']}: paged decode attention, one layer, D = 128")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main()
