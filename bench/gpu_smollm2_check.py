"""The GPU acceptance check of a SmolLM2 CUDA package against the CPU build.

A GPU host run carries at most 64 MiB, and the fp16 weights are 257 MiB, so the host gets the package
without its shards plus the 94 MiB GGUF (split over two runs) and rebuilds the shards here with the
project's own converter and writer; identical md5s prove they are the weights built on the CPU host.

    # on the build host (CPU): greedy tokens and top logits of the fp32 CPU package
    python bench/gpu_smollm2_check.py expected --package dist/smollm2-fp32-llvm -o expected.json
    # on the GPU host
    python bench/gpu_smollm2_check.py weights --gguf SmolLM2.gguf --package dist/smollm2-fp16-cuda
    python bench/gpu_smollm2_check.py check --package dist/smollm2-fp16-cuda --expected expected.json \
        --device cuda --json result.json

The same check compares a tensor-parallel package with the one-shard build of its checkpoint, both
on GPUs (`expected --device cuda` on the one-shard package, then `check` on the sharded one).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atom_tvm import package  # noqa: E402

PROMPTS = [
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWrite a short poem about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after",
]
N_TOKENS = 32
TOP_K = 20


def greedy(chat, ids: list[int], forced: list[int] | None = None):
    """Greedy steps; with `forced`, feed those tokens instead (teacher forcing) to compare logits."""
    chat.reset()
    logits = chat.prefill(ids)
    tokens, rows = [], []
    for step in range(N_TOKENS):
        row = logits.numpy().reshape(-1).astype(np.float64)
        rows.append(row)
        tokens.append(int(row.argmax()))
        logits = chat.decode(forced[step] if forced else tokens[-1])
    return tokens, rows


def make_expected(args) -> None:
    from atom_tvm.runtime.engine import ChatModel

    chat = ChatModel(args.package, args.device)
    cases = []
    for text in PROMPTS:
        ids = chat.tokenizer.encode(text, add_special_tokens=False).ids
        tokens, rows = greedy(chat, ids)
        top = [np.argsort(-r)[:TOP_K] for r in rows]
        cases.append({"prompt_ids": ids, "tokens": tokens, "top_ids": [t.tolist() for t in top],
                      "top_logits": [r[t].tolist() for r, t in zip(rows, top)],
                      "text": chat.tokenizer.decode(tokens)})
    Path(args.output).write_text(json.dumps({"source": str(args.package), "cases": cases}))


def rebuild_weights(args) -> None:
    """Shards of `--package` from the GGUF, through convert_gguf and the package writer."""
    from safetensors.numpy import save_file

    from atom_tvm.convert_gguf import build_config, convert_tensors, open_gguf
    from atom_tvm.hf_weights import iter_params

    pkg = Path(args.package)
    index = json.loads((pkg / package.TENSOR_CACHE).read_text())
    expected = [(r["name"], tuple(r["shape"]), r["dtype"]) for shard in index["records"] for r in shard["records"]]
    reader = open_gguf(Path(args.gguf))
    config = build_config(reader, Path(args.gguf))
    with tempfile.TemporaryDirectory() as hf_dir:
        save_file(convert_tensors(reader, Path(args.gguf), config), f"{hf_dir}/model.safetensors")
        written = package.write_tensor_cache(pkg, iter_params(Path(hf_dir), expected))
    same = [a["md5sum"] == b["md5sum"] for a, b in zip(written["records"], index["records"])]
    print(f"rebuilt {len(same)} shards; md5 identical to the build host's: {all(same)}")
    if not all(same) or len(written["records"]) != len(index["records"]):
        sys.exit("weights differ from the package built on the CPU host")


def check(args) -> None:
    from atom_tvm.runtime.engine import ChatModel

    expected = json.loads(Path(args.expected).read_text())
    chat = ChatModel(args.package, args.device)
    results = []
    for case in expected["cases"]:
        tokens, _ = greedy(chat, case["prompt_ids"])
        _, forced_rows = greedy(chat, case["prompt_ids"], forced=case["tokens"])
        # Teacher-forced on the CPU's tokens, so each step's logits are comparable.
        top_err = max(float(np.max(np.abs(row[ids] - np.asarray(ref))))
                      for row, ids, ref in zip(forced_rows, case["top_ids"], case["top_logits"]))
        argmax_agree = sum(int(r.argmax()) == t for r, t in zip(forced_rows, case["tokens"]))
        results.append({"identical_greedy_tokens": tokens == case["tokens"],
                        "first_difference": next((i for i, (a, b) in enumerate(zip(tokens, case["tokens"]))
                                                  if a != b), None),
                        "forced_argmax_agreement": f"{argmax_agree}/{N_TOKENS}",
                        "max_abs_top{}_logit_diff".format(TOP_K): top_err,
                        "gpu_text": chat.tokenizer.decode(tokens), "cpu_text": case["text"]})
    report = {"package": str(args.package), "device": args.device, "reference": expected["source"],
              "cases": results}
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("expected")
    e.add_argument("--package", required=True)
    e.add_argument("-o", "--output", required=True)
    e.add_argument("--device", default="cpu", help="cpu, or cuda for a reference package on the GPU")
    w = sub.add_parser("weights")
    w.add_argument("--gguf", required=True)
    w.add_argument("--package", required=True)
    c = sub.add_parser("check")
    c.add_argument("--package", required=True)
    c.add_argument("--expected", required=True)
    c.add_argument("--device", default="cuda")
    c.add_argument("--json")
    args = p.parse_args()
    {"expected": make_expected, "weights": rebuild_weights, "check": check}[args.cmd](args)


if __name__ == "__main__":
    main()
