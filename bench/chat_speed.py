"""Prefill and decode speed of one package on one device, through the chat runtime.

    python bench/chat_speed.py dist/NAME --device cuda --prompt-lengths 32,128,512 --decode-tokens 128 \
        --json docs/bench/chat_speed.json

Prefill: one prompt of each length into an empty cache (median of --repeats). Decode: greedy steps
one token at a time, logits copied to the host each step as the chat does (median tok/s over the run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atom_tvm.runtime.engine import ChatModel  # noqa: E402


def time_prefill(chat: ChatModel, n_tokens: int, repeats: int, rng) -> float:
    times = []
    for _ in range(repeats + 1):  # the first run warms up (module load, allocator)
        ids = rng.integers(100, 10000, size=n_tokens).tolist()
        chat.reset()
        t0 = time.perf_counter()
        chat.prefill(ids).numpy()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def time_decode(chat: ChatModel, n_tokens: int, rng) -> float:
    chat.reset()
    token = int(np.argmax(chat.prefill(rng.integers(100, 10000, size=16).tolist()).numpy()))
    steps = []
    for _ in range(n_tokens):
        t0 = time.perf_counter()
        token = int(np.argmax(chat.decode(token).numpy()))
        steps.append(time.perf_counter() - t0)
    return statistics.median(steps[4:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("package", type=Path)
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompt-lengths", default="32,128,512")
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    chat = ChatModel(args.package, args.device)
    rng = np.random.default_rng(0)
    rows = []
    for n in map(int, args.prompt_lengths.split(",")):
        seconds = time_prefill(chat, n, args.repeats, rng)
        rows.append({"phase": "prefill", "tokens": n, "seconds": seconds, "tok_per_s": n / seconds})
    step = time_decode(chat, args.decode_tokens, rng)
    rows.append({"phase": "decode", "tokens": 1, "seconds": step, "tok_per_s": 1 / step})
    print(f"{'phase':8} {'tokens':>6} {'ms':>9} {'tok/s':>9}")
    for r in rows:
        print(f"{r['phase']:8} {r['tokens']:6d} {r['seconds'] * 1e3:9.2f} {r['tok_per_s']:9.1f}")
    if args.json:
        result = {"package": str(args.package), "device": args.device, "quantization": chat.config["quantization"],
                  "target": chat.config["target"], "arch": chat.config.get("arch", []), "rows": rows,
                  "command": " ".join(sys.argv)}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
