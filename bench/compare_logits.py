"""Decode logits of two library-only packages of one model, on the same random weights (seed 0)
and tokens: 4 prompts of 37 tokens prefilled one by one, then one decode step of the 4. Prints the
relative L2 difference and the argmax agreement; exits 1 if they are 1% or more apart (or not
finite: random INT4 weights can drive a deep model's logits to NaN, so check an fp16 pair).

    python bench/compare_logits.py OUT/old/fp16 OUT/new/fp16   # packages from bench/ab_packages.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e import random_package  # noqa: E402

PROMPTS, PROMPT_TOKENS = 4, 37


def decode_logits(package: Path) -> np.ndarray:
    pkg = random_package(package, "cuda", seed=0)
    rng = np.random.default_rng(1)
    vocab = pkg.metadata["vocab_size"]
    kv = pkg.open_kv_cache(max_batch=PROMPTS, max_total_tokens=PROMPTS * (PROMPT_TOKENS + 16))
    for seq in range(PROMPTS):
        kv.add_sequence(seq)
        ids = rng.integers(0, vocab, PROMPT_TOKENS).tolist()
        arg = kv.begin_forward([seq], [len(ids)])
        pkg.forward("batch_prefill", ids, arg, logit_positions=[len(ids) - 1])
        kv.end_forward()
    arg = kv.begin_forward(list(range(PROMPTS)), [1] * PROMPTS)
    logits = pkg.forward("batch_decode", rng.integers(0, vocab, PROMPTS).tolist(), arg, rows=PROMPTS).numpy()
    kv.end_forward()
    return logits.reshape(PROMPTS, -1).astype(np.float64)


def main() -> int:
    a, b = (decode_logits(Path(p)) for p in sys.argv[1:3])
    rel = np.linalg.norm(a - b) / np.linalg.norm(a)
    agree = int((a.argmax(1) == b.argmax(1)).sum())
    print(f"relative L2 {rel:.3g}, max |diff| {np.abs(a - b).max():.3g}, max |logit| {np.abs(a).max():.3g}, "
          f"argmax agree {agree}/{PROMPTS}")
    return 0 if np.isfinite(rel) and rel < 1e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
