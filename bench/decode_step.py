"""Where a decode step's time goes: host-side parts and GPU kernel time of `batch_decode` at batch B,
for one package (one GPU, or a tensor-parallel one through its Disco session).

    python bench/decode_step.py --package .device/e2e13b/atom-w4a4 --batch 64,256 --context 256 \
        -o $OUT/decode_step.json

A library-only package gets random weights (as in `bench/e2e.py`). B sequences are prefilled with
``--context`` random tokens; then each timed step appends one token to every sequence and takes it
back (``popn``), so every step sees the same cache. Per step: the page tables (`begin_forward`),
the forward (`batch_decode`, until its logits are ready: on one GPU a device sync, on several the
copy back from worker 0), and the host's argmax over the float32 logits. GPU kernel time comes from
torch's CUPTI profiler over the same steps (kernels of this process: on several GPUs, worker 0's).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e import random_package  # noqa: E402


def prefill(pkg, kv, batch: int, context: int, rng) -> None:
    chunk = pkg.prefill_chunk_size
    for seq in range(batch):
        kv.add_sequence(seq)
        ids = rng.integers(0, pkg.metadata["vocab_size"], context).tolist()
        for start in range(0, context, chunk):
            part = ids[start:start + chunk]
            arg = kv.begin_forward([seq], [len(part)])
            pkg.forward("batch_prefill", part, arg, logit_positions=[len(part) - 1])
            kv.end_forward()


def timed_steps(pkg, kv, batch: int, steps: int, rng) -> dict:
    seqs = list(range(batch))
    parts = {"tables_ms": [], "forward_ms": [], "argmax_ms": []}
    vocab = pkg.metadata["vocab_size"]
    for _ in range(steps):
        tokens = rng.integers(0, vocab, batch).tolist()
        t0 = time.perf_counter()
        arg = kv.begin_forward(seqs, [1] * batch)
        t1 = time.perf_counter()
        logits = pkg.forward("batch_decode", tokens, arg, rows=batch)
        if hasattr(pkg, "device"):
            pkg.device.sync()
        t2 = time.perf_counter()
        logits.numpy().reshape(batch, -1).argmax(axis=1)
        t3 = time.perf_counter()
        kv.end_forward()
        for seq in seqs:
            kv.popn(seq, 1)
        for key, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
            parts[key].append(dt * 1e3)
    return {key: float(np.mean(v)) for key, v in parts.items()}


def gpu_kernel_ms(pkg, kv, batch: int, steps: int, rng) -> tuple[float, dict]:
    """Summed CUDA kernel time per step, from torch's profiler, and the 12 kernels that take most."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        timed_steps(pkg, kv, batch, steps, rng)
        torch.cuda.synchronize()
    kernels = {e.key: e.device_time_total / 1e3 / steps for e in prof.key_averages() if e.device_time_total > 0}
    top = dict(sorted(kernels.items(), key=lambda kv_: -kv_[1])[:12])
    return sum(kernels.values()), top


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--package", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", default="64,256")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("-o", "--output", type=Path, required=True)
    args = p.parse_args()
    pkg = random_package(args.package, args.device, seed=0)
    rng = np.random.default_rng(0)
    rows = []
    for batch in (int(b) for b in args.batch.split(",")):
        kv = pkg.open_kv_cache(max_batch=batch, max_total_tokens=batch * (args.context + 16))
        prefill(pkg, kv, batch, args.context, rng)
        timed_steps(pkg, kv, batch, 3, rng)  # warm-up
        row = {"package": args.package.name, "batch": batch, "context": args.context,
               **timed_steps(pkg, kv, batch, args.steps, rng)}
        if args.device == "cuda":
            row["gpu_kernels_ms"], row["top_kernels_ms"] = gpu_kernel_ms(pkg, kv, batch, args.steps, rng)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del kv
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
