"""Host cost of the KV cache's page manager per forward step (atom_tvm.runtime.kv_pages).

`PageManager.begin_forward` runs on the CPU before every decode step for the whole batch: it
takes the pages the new tokens need and writes the step's CSR page tables, slots and positions.
It has to stay far below the GPU time of a step (20-40 ms for a 7B model at batch 256).

Decode: B sequences of L tokens each append one token per step. A round is P = 16 steps, so
every sequence crosses exactly one page boundary per round (one step in 16 takes a new page, as
in a real decode); the round's mean is one sample, and the sequences are cut back by `popn`
(not timed) before the next round. Inputs are int64 numpy arrays (what an engine keeps); the
"lists" column passes Python lists instead. Prefill: one begin_forward of B new sequences of
L tokens each (timed), removed again afterwards (not timed).

    python bench/page_manager.py --json docs/bench/page_manager.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import tvm_ffi

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atom_tvm.runtime.kv_pages import DEFAULT_PAGE_SIZE, PageManager  # noqa: E402

BATCHES = (1, 16, 64, 128, 256)
CONTEXTS = (512, 1024, 4096)
PREFILLS = ((1, 512), (1, 4096), (16, 512), (64, 1024))


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _manager(num_sequences: int, tokens_each: int) -> PageManager:
    pages = num_sequences * (-(-tokens_each // DEFAULT_PAGE_SIZE) + 2)
    return PageManager(pages, DEFAULT_PAGE_SIZE, max_batch=max(BATCHES))


def decode_step_us(batch: int, context: int, rounds: int, as_lists: bool) -> float:
    """Median over rounds of the mean begin_forward time of a decode step, in microseconds."""
    steps = DEFAULT_PAGE_SIZE
    pm = _manager(batch, context + steps)
    ids = np.arange(batch, dtype=np.int64)
    for seq_id in ids.tolist():
        pm.add_sequence(seq_id)
    pm.begin_forward(ids, np.full(batch, context, np.int64))
    ones = np.ones(batch, np.int64)
    args = (ids.tolist(), ones.tolist()) if as_lists else (ids, ones)
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            pm.begin_forward(*args)
        samples.append((time.perf_counter() - start) / steps)
        for seq_id in ids.tolist():
            pm.popn(seq_id, steps)
    return statistics.median(samples) * 1e6


def prefill_step_us(batch: int, tokens: int, repeats: int) -> float:
    pm = _manager(batch, tokens)
    ids = np.arange(batch, dtype=np.int64)
    lengths = np.full(batch, tokens, np.int64)
    samples = []
    for _ in range(repeats):
        for seq_id in ids.tolist():
            pm.add_sequence(seq_id)
        start = time.perf_counter()
        pm.begin_forward(ids, lengths)
        samples.append(time.perf_counter() - start)
        for seq_id in ids.tolist():
            pm.remove_sequence(seq_id)
    return statistics.median(samples) * 1e6


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=200, help="decode rounds of 16 steps per case")
    parser.add_argument("--repeats", type=int, default=50, help="prefill steps per case")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    decode = []
    for batch in BATCHES:
        for context in CONTEXTS:
            numpy_us = decode_step_us(batch, context, args.rounds, as_lists=False)
            lists_us = decode_step_us(batch, context, args.rounds, as_lists=True)
            decode.append({"batch": batch, "context": context, "pages_per_sequence": -(-context // DEFAULT_PAGE_SIZE),
                           "us_per_step": round(numpy_us, 2), "us_per_step_lists": round(lists_us, 2),
                           "ns_per_sequence": round(numpy_us * 1e3 / batch, 1)})
    prefill = [{"batch": batch, "tokens_each": tokens, "us_per_step": round(prefill_step_us(batch, tokens,
                                                                                           args.repeats), 2)}
               for batch, tokens in PREFILLS]

    lines = ["decode step (one new token per sequence), median of rounds:", "",
             "| batch | context | pages/seq | us/step (numpy ids) | us/step (list ids) | ns/sequence |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['batch']} | {r['context']} | {r['pages_per_sequence']} | {r['us_per_step']:.1f} | "
              f"{r['us_per_step_lists']:.1f} | {r['ns_per_sequence']:.0f} |" for r in decode]
    lines += ["", "prefill step (new sequences), median:", "",
              "| batch | tokens each | us/step |", "| ---: | ---: | ---: |"]
    lines += [f"| {r['batch']} | {r['tokens_each']} | {r['us_per_step']:.1f} |" for r in prefill]
    print("\n".join(lines))

    result = {
        "what": "PageManager.begin_forward host time per step (bench/page_manager.py)",
        "date": datetime.date.today().isoformat(),
        "cpu": _cpu_name(),
        "python": platform.python_version(),
        "tvm_ffi": tvm_ffi.__version__,
        "page_size": DEFAULT_PAGE_SIZE,
        "decode_rounds": args.rounds,
        "prefill_repeats": args.repeats,
        "decode": decode,
        "prefill": prefill,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
