"""`python -m atom_tvm.build`: compile a Hugging Face Llama into an MLC-style package.

    python -m atom_tvm.build --model models/SmolLM2-135M-Instruct --target llvm \
        --quantization fp32 -o dist/smollm2-fp32-llvm
    python -m atom_tvm.build --model ... --target cuda --arch sm_80,sm_89,sm_90a \
        --quantization fp16 -o dist/smollm2-fp16-cuda
    python -m atom_tvm.build --model models/SmolLM2-135M-Instruct-atom --target llvm \
        --quantization atom-w4a4 -o dist/smollm2-atom-w4a4-llvm

``--quantization`` picks a scheme of `atom_tvm.quantization.schemes` (fp32, fp16, w4a16, w8a8,
atom-w4a4); atom-w4a4 builds from an Atom checkpoint (`python -m atom_tvm.quantize`), the others
from a Hugging Face directory.

Runs on any machine: CUDA code is compiled here by nvcc into SASS for every requested arch (no GPU
needed), so the GPU host needs only the TVM runtime. The package is assembled in a temporary
directory next to the output and renamed into place at the end, so a failed build leaves nothing.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from atom_tvm import package
from atom_tvm.errors import UserError, run_command
from atom_tvm.staging import check_output_dir, staged_output_dir
from atom_tvm.hf_weights import read_json, read_tokenizer_files

DEFAULT_PAGE_SIZE = 16
MODEL_LIB_NAME = "model-{target}.so"


class Progress:
    """One line per stage with its wall time, so a long CUDA build shows where it is."""

    def __init__(self, total: int):
        self.total, self.step, self.t0 = total, 0, time.perf_counter()

    def __call__(self, what: str) -> None:
        self.step += 1
        print(f"[{self.step}/{self.total}] {what} (t={time.perf_counter() - self.t0:.1f}s)", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m atom_tvm.build", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, type=Path,
                   help="Hugging Face model directory (atom-w4a4: an Atom checkpoint from python -m atom_tvm.quantize)")
    p.add_argument("--target", required=True, help="llvm (CPU) or cuda")
    p.add_argument("--arch", default="", help="CUDA archs, comma separated, e.g. sm_80,sm_89,sm_90a")
    p.add_argument("--quantization", default="fp16",
                   help="fp32 (llvm only), fp16, w4a16, w8a8 or atom-w4a4 (default fp16)")
    p.add_argument("--group-size", type=int, default=None, help="w4a16: INT4 group size, 64 or 128 (default 128)")
    p.add_argument("--kv-cache", default=None,
                   help="tvm (TVM's paged cache in the model dtype) or Atom's quantized pages: int4, int8, fp16 "
                        "(default: the scheme's, int4 for atom-w4a4 and tvm otherwise)")
    p.add_argument("--tensor-parallel-shards", type=int, default=1,
                   help="split the model over N GPUs of one host (Megatron-style; heads, KV heads and MLP "
                        "channels must divide by N; atom-w4a4 needs a checkpoint quantized for N)")
    p.add_argument("-o", "--output", required=True, type=Path, help="package directory to create")
    p.add_argument("--context-window-size", type=int, default=None,
                   help="max tokens per sequence (default: the model's, capped at 4096)")
    p.add_argument("--prefill-chunk-size", type=int, default=512, help="max tokens per prefill call")
    p.add_argument("--conv-template", default=None,
                   help="llama-2, llama-3, chatml or model (the model's own chat template; default when it has one)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    return p.parse_args(argv)


def validate(args: argparse.Namespace):
    """All argument checks before any slow work, so bad input fails in a second."""
    from atom_tvm.quantization.schemes import SchemeOptions, resolve
    from deploy.targets import make_target, parse_archs
    from relax_models.llama import LlamaConfig

    if not args.model.is_dir():
        raise UserError(f"{args.model}: model directory not found; pass a Hugging Face model directory "
                        "(python -m atom_tvm.convert_gguf writes one for the bundled SmolLM2)")
    cfg = LlamaConfig.from_model_dir(args.model)
    shards = args.tensor_parallel_shards
    cfg.check_tensor_parallel(shards)
    scheme = resolve(args.quantization, args.model, cfg,
                     SchemeOptions(group_size=args.group_size, tensor_parallel_shards=shards))
    scheme.check_tensor_parallel(shards)
    if args.target not in ("llvm", "cuda"):
        make_target(args.target, [])  # raises with the list of valid targets
    if args.target == "cuda":
        if not args.arch:
            raise UserError("--target cuda needs --arch, e.g. --arch sm_80,sm_89,sm_90a")
        archs = parse_archs(args.arch)
    else:
        if args.arch:
            raise UserError("--arch is for --target cuda only")
        archs = []
    scheme.check_target(args.target)
    if shards > 1 and args.kv_cache == "tvm":
        raise UserError(f"--tensor-parallel-shards {shards} --kv-cache tvm: TVM's cache object is not driven "
                        "per shard; use --kv-cache fp16 (the same precision in Atom's pages), int8 or int4")
    # Sharded, a float scheme keeps its precision in Atom's fp16 pages instead of TVM's cache.
    args.kv_cache = args.kv_cache or (scheme.kv_cache if shards == 1 or scheme.kv_cache != "tvm" else "fp16")
    atom_kv = None
    if args.kv_cache != "tvm":
        from relax_models.atom_kv_cache import AtomKVConfig

        atom_kv = AtomKVConfig(args.kv_cache, cfg.num_hidden_layers, cfg.num_attention_heads // shards,
                               cfg.num_key_value_heads // shards, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    check_output_dir(args.output, args.force)
    ctx = args.context_window_size or min(cfg.max_position_embeddings, 4096)
    if ctx < 16 or args.prefill_chunk_size < 1:
        raise UserError("--context-window-size must be >= 16 and --prefill-chunk-size >= 1")
    args.context_window_size = ctx
    args.prefill_chunk_size = min(args.prefill_chunk_size, ctx)
    return cfg, scheme, make_target(args.target, archs), archs, atom_kv


def chat_config(args, cfg, scheme, model_dir: Path, lib_name: str) -> dict:
    """mlc-chat-config.json: what the runtime needs besides the library and the weights."""
    tok_cfg = read_json(model_dir / "tokenizer_config.json")
    gen_cfg = read_json(model_dir / "generation_config.json")
    hf_cfg = read_json(model_dir / "config.json")
    chat_template = tok_cfg.get("chat_template")
    conv = args.conv_template or ("model" if chat_template else
                                  "llama-3" if cfg.vocab_size >= 128000 else "llama-2")
    if conv not in ("llama-2", "llama-3", "chatml", "model"):
        raise UserError(f"--conv-template {conv!r}: choose llama-2, llama-3, chatml or model")
    if conv == "model" and not chat_template:
        raise UserError(f"{model_dir}/tokenizer_config.json has no chat_template; pick --conv-template "
                        "llama-2, llama-3 or chatml")

    def first(*keys, default=None):
        for source in (gen_cfg, hf_cfg):
            for k in keys:
                if source.get(k) is not None:
                    return source[k]
        return default

    eos = first("eos_token_id", default=2)
    return {
        "model_type": "llama",
        "quantization": args.quantization,
        "quantization_config": {**scheme.to_json(), "kv_cache": args.kv_cache},
        "model_config": hf_cfg,
        "context_window_size": args.context_window_size,
        "prefill_chunk_size": args.prefill_chunk_size,
        "page_size": DEFAULT_PAGE_SIZE,
        "kv_cache": args.kv_cache,
        "tensor_parallel_shards": args.tensor_parallel_shards,
        "conv_template": conv,
        "chat_template": chat_template,
        "tokenizer_files": [p.name for p in read_tokenizer_files(model_dir)],
        "bos_token_id": first("bos_token_id", default=1),
        "eos_token_id": eos,
        "pad_token_id": first("pad_token_id", default=eos if isinstance(eos, int) else eos[0]),
        "temperature": float(gen_cfg.get("temperature", 0.7)),
        "top_p": float(gen_cfg.get("top_p", 0.95)),
        "max_tokens": 512,
        "model_lib": lib_name,
        "target": args.target,
        "arch": args.arch.split(",") if args.arch else [],
    }


def write_sharded_weights(out_dir: Path, cfg, scheme, target, model_dir: Path, expected: list, shards: int) -> dict:
    """Each shard's weights in its own tensor cache (``tp-shard-<i>/``), so a shard loads without the
    others: the one-shard model's parameters, read once per shard and cut by the scheme's
    `shard_param`, checked against what the shard's library takes. Returns totals over the shards."""
    from atom_tvm.compile import export_model

    _, whole = export_model(cfg, scheme, target)  # the unsharded model's parameters
    want = {name: (tuple(shape), dtype) for name, shape, dtype in expected}
    total = {"metadata": {"ParamBytes": 0}, "records": []}
    for shard in range(shards):
        def cut():
            for name, array in scheme.params(model_dir, whole):
                piece = scheme.shard_param(name, array, cfg, shard, shards)
                if piece is None:
                    continue
                if (tuple(piece[1].shape), str(piece[1].dtype)) != want.get(piece[0]):
                    raise UserError(f"shard {shard}: {piece[0]} cut to {piece[1].shape} {piece[1].dtype}, but the "
                                    f"shard's library takes {want.get(piece[0])}; the checkpoint and the model "
                                    "disagree")
                yield piece
        cache = package.write_tensor_cache(out_dir / package.tensor_parallel_dir(shard), cut())
        names = [r["name"] for data_file in cache["records"] for r in data_file["records"]]
        if sorted(names) != sorted(want):
            raise UserError(f"shard {shard}: missing parameters {sorted(set(want) - set(names))[:3]}")
        total["metadata"]["ParamBytes"] += cache["metadata"]["ParamBytes"]
        total["records"] += cache["records"]
    return total


def build(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    cfg, scheme, target, archs, atom_kv = validate(args)
    shards = args.tensor_parallel_shards
    progress = Progress(5)
    progress(f"model {args.model.name}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
             f"heads {cfg.num_attention_heads}/{cfg.num_key_value_heads}, vocab {cfg.vocab_size}")

    from atom_tvm.compile import compile_model  # heavy TVM imports only once input is valid

    lib_name = MODEL_LIB_NAME.format(target=args.target)
    with staged_output_dir(args.output) as tmp:
        conf = chat_config(args, cfg, scheme, args.model, lib_name)
        progress(f"compile for {args.target}{' ' + ','.join(archs) if archs else ''} "
                 f"({args.quantization}, context {args.context_window_size})")
        expected = compile_model(cfg, scheme, target, archs, tmp / lib_name,
                                 metadata={"model_type": "llama", "quantization": args.quantization,
                                           "context_window_size": args.context_window_size,
                                           "prefill_chunk_size": args.prefill_chunk_size,
                                           "page_size": DEFAULT_PAGE_SIZE,
                                           "tensor_parallel_shards": shards},
                                 atom_kv=atom_kv, tensor_parallel_shards=shards)
        progress(f"weights: {len(expected)} tensors ({scheme.name}"
                 f"{f', {shards} tensor-parallel shards' if shards > 1 else ''})")
        if shards == 1:
            cache = package.write_tensor_cache(tmp, scheme.params(args.model, expected))
        else:
            cache = write_sharded_weights(tmp, cfg, scheme, target, args.model, expected, shards)
        for f in read_tokenizer_files(args.model):
            shutil.copy2(f, tmp / f.name)
        package.write_json_atomic(tmp / package.CHAT_CONFIG, conf)
        progress(f"package: {cache['metadata']['ParamBytes'] / 2**20:.1f} MiB of weights in "
                 f"{len(cache['records'])} shards, tokenizer, {package.CHAT_CONFIG}")
    out = args.output
    progress(f"done: {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: build(argv))


if __name__ == "__main__":
    sys.exit(main())
