"""End-to-end throughput study (issue 6): our continuous-batching engine on Llama-2-7B shapes with
random weights, per quantization scheme, against HF transformers fp16 ``generate``.

Three steps, each a subcommand:

    # here (no GPU): libraries only, for a Llama-2-7B config; no weights are read or written
    python bench/e2e.py build --target cuda --arch sm_90a -o .device/e2e
    # on the GPU host (runtime-only TVM is enough, plus torch and transformers for the baseline)
    python bench/e2e.py run --packages .device/e2e --device cuda -o $OUT/e2e_h200.json
    # anywhere: the markdown table and the PNG from the JSON
    python bench/e2e.py report docs/bench/e2e_h200.json --png docs/bench/e2e_h200.png

Timing does not depend on weight values, so ``build`` compiles each variant's library from a
config-only model directory (config.json, a synthetic word-level tokenizer, and for atom-w4a4 the
checkpoint's quantization config) and ``run`` fills the parameters the library's ``_metadata`` lists
with random values generated on the device (never on disk): float tensors N(0, 0.02) (norm weights
1), INT4/INT8 codes and masks uniform over their bytes, int32 channel indices random permutations
(`atom_tvm.runtime.random_weights`).

Requests (`draw_requests`): prompt and output lengths are lognormal with ShareGPT's means as the
vLLM paper reports them (161 prompt, 338 output tokens; sigma 1), prompts capped at 512 tokens and
outputs at 1024, token ids uniform; seeded. Nothing ends a request early: the package's EOS id is
``vocab_size``, which the model cannot produce.

A point is one wave of B requests, submitted at once to an engine with room for all of them: the
engine prefills the prompts (chunks of ``prefill_chunk_size`` tokens a step, decoding the requests
already prefilled in the same steps), then runs decode-only steps; we time each step and report the
first ``--decode-steps`` decode-only steps: generated tokens/s over them and their mean latency (one
token per running request per step, so the step latency is the per-token decode latency). The
prompt phase before them is reported separately (prompt tokens/s, its decode work included). Under the fixed memory budget (``--budget-gib``, weights plus KV cache) each scheme runs
at the largest batch whose whole wave (prompt plus output of every request) fits the KV cache
left after its weights, with the engine's cache sized to exactly that remainder.

The outside baseline is HF transformers fp16 ``generate`` (torch, cuBLAS, SDPA attention) on the
same random-weight config with the same prompts, left-padded to the longest, timed the same way:
the window's decode steps after the prompt's forward.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from atom_tvm.errors import UserError, run_command  # noqa: E402

#: Llama-2-7B's architecture (meta-llama/Llama-2-7b-hf config.json).
LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
    "num_hidden_layers": 32, "vocab_size": 32000, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "max_position_embeddings": 4096, "hidden_act": "silu", "tie_word_embeddings": False,
    "bos_token_id": 1, "torch_dtype": "float16",
}

#: Llama-2-13B's architecture (meta-llama/Llama-2-13b-hf config.json), for the tensor-parallel study.
LLAMA2_13B = {**LLAMA2_7B, "hidden_size": 5120, "intermediate_size": 13824, "num_attention_heads": 40,
              "num_key_value_heads": 40, "num_hidden_layers": 40}
SHAPES = {"llama-2-7b": LLAMA2_7B, "llama-2-13b": LLAMA2_13B}

#: name -> (--quantization, --kv-cache) of each package the study compares.
VARIANTS = {
    "fp16": ("fp16", "tvm"),
    "fp16-kv4": ("fp16", "int4"),
    "w4a16": ("w4a16", "tvm"),
    "w8a8": ("w8a8", "tvm"),
    "atom-w4a4": ("atom-w4a4", "int4"),
}
#: Atom's paper configuration: INT4 groups of 128, 128 INT8 outlier channels.
ATOM_GROUP_SIZE, ATOM_OUTLIERS = 128, 128

#: ShareGPT's mean prompt and output lengths in tokens (vLLM paper, Kwon et al. 2023, section 6.1).
SHAREGPT_MEAN_PROMPT, SHAREGPT_MEAN_OUTPUT = 161.31, 337.99
LENGTH_SIGMA = 1.0
MAX_PROMPT, MAX_OUTPUT = 512, 1024
BATCH_SIZES = (8, 16, 32, 64, 128, 256)
GIB = 2 ** 30


# --- build (the build host) ----------------------------------------------------------------------


def write_config_dir(out: Path, config: dict, shards: int = 1) -> Path:
    """A model directory with what a library-only build reads: config.json, a word-level tokenizer
    of the config's vocabulary, generation_config.json with the unreachable EOS id ``vocab_size``
    (random weights would otherwise end requests at random lengths), and the Atom checkpoint's
    quantization config for ``--quantization atom-w4a4``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from atom_tvm.package import write_json_atomic
    from atom_tvm.quantize import LAYOUT_VERSION, QUANT_CONFIG
    from atom_tvm.quantization.simulate import preset

    out.mkdir(parents=True, exist_ok=True)
    vocab = config["vocab_size"]
    write_json_atomic(out / "config.json", {**config, "eos_token_id": vocab})
    write_json_atomic(out / "generation_config.json", {"bos_token_id": 1, "eos_token_id": vocab})
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(out / "tokenizer.json"))
    qcfg = preset("atom-w4a4", group_size=ATOM_GROUP_SIZE, n_outliers=ATOM_OUTLIERS)
    write_json_atomic(out / QUANT_CONFIG, {"layout_version": LAYOUT_VERSION, "scheme": "atom-w4a4",
                                           "config": dataclasses.asdict(qcfg), "calibration": "none: random weights",
                                           "tensor_parallel_shards": shards})
    return out


def build_library_package(model_dir: Path, out: Path, quantization: str, kv_cache: str, target: str,
                          arch: str, prefill_chunk: int, context: int, shards: int = 1) -> Path:
    """A package without weights: library, mlc-chat-config.json, tokenizer. Same checks and config
    as `python -m atom_tvm.build`, which also writes the weights (and so needs real ones)."""
    import shutil

    from atom_tvm import build
    from atom_tvm.compile import compile_model
    from atom_tvm.hf_weights import read_tokenizer_files
    from atom_tvm.package import CHAT_CONFIG, write_json_atomic
    from atom_tvm.staging import staged_output_dir

    argv = ["--model", str(model_dir), "--target", target, "--quantization", quantization,
            "--kv-cache", kv_cache, "-o", str(out), "--force", "--prefill-chunk-size", str(prefill_chunk),
            "--context-window-size", str(context), "--conv-template", "llama-2",
            "--tensor-parallel-shards", str(shards)]
    args = build.parse_args(argv + (["--arch", arch] if arch else []))
    cfg, scheme, tvm_target, archs, atom_kv = build.validate(args)
    lib_name = build.MODEL_LIB_NAME.format(target=target)
    with staged_output_dir(out) as tmp:
        compile_model(cfg, scheme, tvm_target, archs, tmp / lib_name,
                      metadata={"model_type": "llama", "quantization": quantization,
                                "context_window_size": args.context_window_size,
                                "prefill_chunk_size": args.prefill_chunk_size, "page_size": build.DEFAULT_PAGE_SIZE,
                                "tensor_parallel_shards": shards},
                      atom_kv=atom_kv, tensor_parallel_shards=shards)
        for f in read_tokenizer_files(model_dir):
            shutil.copy2(f, tmp / f.name)
        write_json_atomic(tmp / CHAT_CONFIG, build.chat_config(args, cfg, scheme, model_dir, lib_name))
    return out


def system_name(variant: str, shards: int) -> str:
    """A package's system name in the study: the variant, with ``-tp<N>`` when split over N GPUs."""
    return variant if shards == 1 else f"{variant}-tp{shards}"


def parse_system(system: str) -> tuple[str, int]:
    """(variant, shards) of a system name."""
    variant, sep, shards = system.rpartition("-tp")
    if sep and shards.isdigit() and variant in VARIANTS:
        return variant, int(shards)
    return system, 1


def cmd_build(args) -> None:
    variants = _variant_list(args.variants)
    config = json.loads(Path(args.config).read_text()) if args.config else SHAPES[args.shapes]
    shards = args.tensor_parallel_shards
    # The Atom layout depends on the shard count: one model directory per count.
    model_dir = write_config_dir(args.output / system_name("model", shards), config, shards)
    for name in variants:
        quantization, kv_cache = VARIANTS[name]
        if shards > 1 and kv_cache == "tvm":
            kv_cache = "fp16"  # a sharded build has Atom's pages only (same precision)
        out = args.output / system_name(name, shards)
        t0 = time.perf_counter()
        build_library_package(model_dir, out, quantization, kv_cache, args.target, args.arch,
                              args.prefill_chunk_size, args.context_window_size, shards)
        size = sum(f.stat().st_size for f in out.iterdir())
        print(f"{out.name}: built in {time.perf_counter() - t0:.0f} s, {size / 2**20:.1f} MiB", flush=True)


def _variant_list(text: str) -> list[str]:
    names = [v for v in text.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise UserError(f"--variants {text!r}: choose from {', '.join(VARIANTS)} (comma separated)")
    return names


# --- requests ------------------------------------------------------------------------------------


def lognormal_lengths(rng: np.random.Generator, n: int, mean: float, cap: int) -> np.ndarray:
    """``n`` lengths from a lognormal of the given mean (sigma `LENGTH_SIGMA`), rounded, in [1, cap]."""
    mu = math.log(mean) - LENGTH_SIGMA ** 2 / 2
    return np.clip(np.rint(rng.lognormal(mu, LENGTH_SIGMA, n)), 1, cap).astype(int)


def draw_requests(n: int, vocab_size: int, seed: int, max_prompt: int = MAX_PROMPT,
                  max_output: int = MAX_OUTPUT) -> list[tuple[list[int], int]]:
    """(prompt token ids, output length) of ``n`` requests; the first B are the wave of batch B."""
    rng = np.random.default_rng(seed)
    prompts = lognormal_lengths(rng, n, SHAREGPT_MEAN_PROMPT, max_prompt)
    outputs = lognormal_lengths(rng, n, SHAREGPT_MEAN_OUTPUT, max_output)
    return [(rng.integers(0, vocab_size, int(p)).tolist(), int(o)) for p, o in zip(prompts, outputs)]


def wave_pages(requests: list[tuple[list[int], int]], page_size: int) -> np.ndarray:
    """Cumulative KV pages of the first 1, 2, ... requests run to completion (prompt plus output)."""
    return np.cumsum([-(-(len(p) + o) // page_size) for p, o in requests])


# --- our engine (the GPU host) ---------------------------------------------------------------------


def random_package(package_dir: Path, device: str, seed: int):
    """`LoadedPackage` of a library-only package, its parameters random tensors made on the device
    and handed to TVM through DLPack (no copy)."""
    from atom_tvm.runtime.engine import LoadedPackage, tensor_parallel_shards
    from atom_tvm.runtime.random_weights import param_maker

    if tensor_parallel_shards(package_dir) > 1:
        from atom_tvm.runtime.sharded import ShardedPackage

        return ShardedPackage(package_dir, device, random_seed=seed)  # each GPU makes its shard's weights
    pkg = LoadedPackage(package_dir, device, make_param=param_maker(device, seed))
    release_device_memory(device)
    return pkg


def weight_bytes(metadata: dict) -> int:
    return sum(math.prod(p["shape"]) * np.dtype(p["dtype"]).itemsize for p in metadata["params"])


def run_wave(engine, requests: list[tuple[list[int], int]], decode_steps: int) -> dict:
    """One wave through ``engine``: every step timed until ``decode_steps`` decode-only steps ran
    (or the wave ended); what is left is cancelled."""
    from atom_tvm.runtime.batching import SamplingParams

    handles = [engine.submit(prompt, SamplingParams(temperature=0, max_tokens=out)) for prompt, out in requests]
    prefill_seconds, prefill_generated, decode_seconds, decode_tokens, batches = 0.0, 0, [], 0, []
    while engine.has_work() and len(decode_seconds) < decode_steps:
        before = engine.metrics()
        t0 = time.perf_counter()
        engine.step()
        seconds = time.perf_counter() - t0
        after = engine.metrics()
        generated = after["generated_tokens"] - before["generated_tokens"]
        if after["steps_by_kind"]["decode"] > before["steps_by_kind"]["decode"]:
            decode_seconds.append(seconds)
            decode_tokens += generated
            batches.append(after["batch_size"])
        elif not decode_seconds:
            prefill_seconds += seconds
            prefill_generated += generated
    for handle in handles:
        handle.cancel()
    while engine.has_work():
        engine.step()
    prompt_tokens = sum(len(p) for p, _ in requests)
    return {
        "requests": len(requests), "prompt_tokens": prompt_tokens, "prefill_seconds": prefill_seconds,
        "prefill_prompt_tokens_per_s": prompt_tokens / prefill_seconds if prefill_seconds else None,
        "prefill_generated_tokens": prefill_generated, "decode_steps": len(decode_seconds),
        "decode_step_ms_mean": 1e3 * float(np.mean(decode_seconds)) if decode_seconds else None,
        "decode_batch_mean": float(np.mean(batches)) if batches else None,
        "decode_tokens_per_s": decode_tokens / sum(decode_seconds) if decode_seconds else None,
    }


def warm_up(engine, vocab_size: int) -> None:
    """First calls load kernels and grow the allocator's pools: keep them out of the timings."""
    from atom_tvm.runtime.batching import SamplingParams

    prompts = [list(range(1, 40)), list(range(1, 12))]
    engine.generate([[t % vocab_size for t in p] for p in prompts], SamplingParams(temperature=0, max_tokens=4))


def release_device_memory(device: str) -> None:
    """Give what torch's caching allocator and TVM's pooled one keep unused back to the driver, so
    the next system (or the KV cache) has the whole GPU."""
    gc.collect()
    if device == "cuda":
        import torch
        import tvm_ffi

        torch.cuda.empty_cache()
        tvm_ffi.get_global_func("vm.builtin.memory_manager.clear")()


# --- HF transformers baseline -----------------------------------------------------------------------


def hf_points(config: dict, waves: list[tuple[int, list]], decode_steps: int, device: str, seed: int,
              keep_going) -> list[dict]:
    """HF transformers fp16 ``generate`` (greedy, SDPA) on a random-weight model of ``config``, one
    point per (batch, requests) wave, prompts left-padded to the wave's longest."""
    import torch
    import transformers

    torch.manual_seed(seed)
    # No EOS (ours is the unreachable vocab_size): every request runs every step.
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in config.items()
                                         if k not in ("architectures", "torch_dtype", "eos_token_id")})
    with torch.device(device):
        model = transformers.LlamaForCausalLM._from_config(hf_cfg, dtype=torch.float16, attn_implementation="sdpa")
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0

    class StepClock(transformers.StoppingCriteria):
        """Called once per generated token: stamps the time the step's token exists, never stops."""

        def __init__(self):
            self.stamps: list[float] = []

        def __call__(self, input_ids, scores, **kwargs):
            if input_ids.is_cuda:
                torch.cuda.synchronize()
            self.stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def generate(requests, steps):
        width = max(len(p) for p, _ in requests)
        ids = torch.zeros((len(requests), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (prompt, _) in enumerate(requests):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        clock = StepClock()
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=steps + 1,
                           do_sample=False, stopping_criteria=[clock])
        return t0, clock.stamps, width

    generate(waves[0][1][:2], 2)  # warm-up: cuBLAS handles, kernels
    points = []
    for batch, requests in waves:
        if not keep_going():
            points.append({"system": "hf-fp16", "mode": "unbounded", "batch": batch, "skipped": "time limit"})
            continue
        t0, stamps, width = generate(requests, decode_steps)
        steps = np.diff(stamps)
        points.append({
            "system": "hf-fp16", "mode": "unbounded", "batch": batch, "requests": len(requests),
            "prompt_tokens": sum(len(p) for p, _ in requests), "padded_prompt_tokens": width * len(requests),
            "prefill_seconds": stamps[0] - t0,
            "prefill_prompt_tokens_per_s": sum(len(p) for p, _ in requests) / (stamps[0] - t0),
            "decode_steps": len(steps), "decode_step_ms_mean": 1e3 * float(steps.mean()),
            "decode_batch_mean": float(batch), "decode_tokens_per_s": batch * len(steps) / float(steps.sum()),
        })
        print(_point_line(points[-1]), flush=True)
    return points


# --- the run --------------------------------------------------------------------------------------


def variant_points(package_dir: Path, name: str, requests: list, batch_sizes: list[int], budget_gib: float,
                   decode_steps: int, device: str, seed: int, keep_going) -> list[dict]:
    """The points of one variant: its largest wave that fits ``budget_gib`` (weights + KV) first,
    then every batch size with a KV cache holding the largest wave whole."""
    from atom_tvm.runtime.batching import Engine, kv_budget_pages

    pkg = random_package(package_dir, device, seed)
    vocab = int(pkg.config["model_config"]["vocab_size"])
    weights = weight_bytes(pkg.metadata)
    page_size = int(pkg.metadata["page_size"])
    base = {"system": name, "weights_gib": weights / GIB, "kv_cache": pkg.metadata["kv_cache"].get("format", "tvm"),
            "shards": pkg.tensor_parallel_shards}
    points = []

    def measure(mode: str, batch: int, engine, extra: dict) -> None:
        if not keep_going():
            points.append({**base, "mode": mode, "batch": batch, "skipped": "time limit"})
            return
        wave = run_wave(engine, requests[:batch], decode_steps)
        points.append({**base, "mode": mode, "batch": batch, **extra, **wave})
        print(_point_line(points[-1]), flush=True)

    kv_bytes = int(budget_gib * GIB) - weights
    # The engine gives each sequence one page beyond its tokens (`Engine`), hence `+ n`.
    fits = wave_pages(requests, page_size) + np.arange(1, len(requests) + 1)
    budget_batch = int(np.searchsorted(fits, kv_budget_pages(pkg.metadata, max(kv_bytes, 0)), side="right"))
    mode = f"budget-{budget_gib:g}GiB"
    if budget_batch == 0:
        points.append({**base, "mode": mode, "batch": 0, "skipped": "weights alone exceed the budget"})
    else:
        engine = Engine(pkg, max_batch=budget_batch, kv_bytes=kv_bytes)
        warm_up(engine, vocab)
        measure(mode, budget_batch, engine, {"kv_gib": kv_bytes / GIB, "kv_tokens": engine.kv_pages_total * page_size})
        del engine
        release_device_memory(device)

    largest = max(batch_sizes)
    engine = Engine(pkg, max_batch=largest, kv_tokens=int(wave_pages(requests[:largest], page_size)[-1]) * page_size)
    warm_up(engine, vocab)
    for batch in sorted(batch_sizes, reverse=True):
        measure("unbounded", batch, engine, {"kv_tokens": engine.kv_pages_total * page_size})
    del engine
    if hasattr(pkg, "close"):  # a sharded package's worker processes hold their GPUs until closed
        pkg.close()
    del pkg
    release_device_memory(device)
    return points


def _point_line(p: dict) -> str:
    return (f"{p['system']:>10} {p['mode']:>14} B={p['batch']:>3}: decode {p['decode_tokens_per_s']:9.1f} tok/s, "
            f"{p['decode_step_ms_mean']:7.2f} ms/step (mean batch {p['decode_batch_mean']:.1f}, "
            f"{p['decode_steps']} steps); prefill {p['prompt_tokens']} tokens in {p['prefill_seconds']:.2f} s")


def cmd_run(args) -> None:
    start = time.perf_counter()

    def keep_going() -> bool:
        return time.perf_counter() - start < args.time_limit

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    # Every model directory of one build output holds the same shapes (model, model-tpN).
    config_path = next(args.packages.glob("model*/config.json"), None)
    if config_path is None:
        raise UserError(f"{args.packages}: no model*/config.json; pass the output directory of bench/e2e.py build")
    config = json.loads(config_path.read_text())
    # One pool whatever the batch sizes, so a run of a few of them measures the same waves.
    requests = draw_requests(max(BATCH_SIZES + tuple(batch_sizes)), config["vocab_size"], args.seed,
                             args.max_prompt, args.max_output)
    result = {
        "device": _device_name(args.device), "config": config, "seed": args.seed, "decode_steps": args.decode_steps,
        "budget_gib": args.budget_gib, "batch_sizes": batch_sizes,
        "distribution": {"kind": "lognormal", "sigma": LENGTH_SIGMA, "mean_prompt": SHAREGPT_MEAN_PROMPT,
                         "mean_output": SHAREGPT_MEAN_OUTPUT, "max_prompt": args.max_prompt,
                         "max_output": args.max_output,
                         "drawn_mean_prompt": float(np.mean([len(p) for p, _ in requests])),
                         "drawn_mean_output": float(np.mean([o for _, o in requests]))},
        "points": [],
    }
    systems = [s for s in args.systems.split(",") if s]
    for system in systems:
        if system == "hf-fp16":
            waves = [(b, requests[:b]) for b in sorted(batch_sizes, reverse=True)]
            result["points"] += hf_points(config, waves, args.decode_steps, args.device, args.seed, keep_going)
            release_device_memory(args.device)
        elif parse_system(system)[0] in VARIANTS:
            result["points"] += variant_points(args.packages / system, system, requests, batch_sizes,
                                               args.budget_gib, args.decode_steps, args.device,
                                               args.seed, keep_going)
        else:
            raise UserError(f"--systems {system!r}: choose from hf-fp16, {', '.join(VARIANTS)} "
                            "(a variant built with --tensor-parallel-shards N: <variant>-tpN)")
        result["seconds"] = time.perf_counter() - start
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1))  # after each system: a timeout keeps the rest
    print(f"wrote {args.output} ({time.perf_counter() - start:.0f} s)")


def _device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    import platform

    return platform.processor() or platform.machine()


# --- report ---------------------------------------------------------------------------------------


def measured(points: list[dict]) -> list[dict]:
    return [p for p in points if "skipped" not in p and p.get("decode_tokens_per_s")]


def verdict(result: dict) -> list[str]:
    """The issue's targets against the measured points: at the memory budget atom-w4a4 >= 4x our fp16
    and above w8a8; decode under 100 ms a token at batch 256. A missing point says so."""
    points = measured(result["points"])

    def find(system: str, mode: str, batch: int | None = None) -> dict | None:
        return next((p for p in points if p["system"] == system and p["mode"] == mode
                     and (batch is None or p["batch"] == batch)), None)

    budget = f"budget-{result['budget_gib']:g}GiB"
    atom, fp16, w8a8 = (find(s, budget) for s in ("atom-w4a4", "fp16", "w8a8"))
    lines = []
    if atom and fp16:
        ratio = atom["decode_tokens_per_s"] / fp16["decode_tokens_per_s"]
        lines.append(f"at {result['budget_gib']:g} GiB: atom-w4a4 {atom['decode_tokens_per_s']:.0f} tok/s "
                     f"(batch {atom['batch']}) = {ratio:.2f}x fp16's {fp16['decode_tokens_per_s']:.0f} "
                     f"(batch {fp16['batch']}); target >= 4x: {'met' if ratio >= 4 else 'missed'}")
    else:
        lines.append(f"at {result['budget_gib']:g} GiB: atom-w4a4 or fp16 not measured")
    if atom and w8a8:
        ratio = atom["decode_tokens_per_s"] / w8a8["decode_tokens_per_s"]
        lines.append(f"at {result['budget_gib']:g} GiB: atom-w4a4 = {ratio:.2f}x w8a8's "
                     f"{w8a8['decode_tokens_per_s']:.0f} tok/s (batch {w8a8['batch']}); target > 1x: "
                     f"{'met' if ratio > 1 else 'missed'}")
    else:
        lines.append(f"at {result['budget_gib']:g} GiB: atom-w4a4 or w8a8 not measured")
    largest = max(result["batch_sizes"])
    big = find("atom-w4a4", "unbounded", largest)
    if big:
        ms = big["decode_step_ms_mean"]
        lines.append(f"atom-w4a4 decode at batch {largest}: {ms:.1f} ms a token; target < 100 ms: "
                     f"{'met' if ms < 100 else 'missed'}")
    else:
        lines.append(f"atom-w4a4 decode at batch {largest}: not measured")
    for batch in result["batch_sizes"]:
        ours, hf = find("fp16", "unbounded", batch), find("hf-fp16", "unbounded", batch)
        if ours and hf:
            ratio = ours["decode_tokens_per_s"] / hf["decode_tokens_per_s"]
            lines.append(f"batch {batch}: our fp16 decode = {ratio:.2f}x HF transformers fp16's tokens/s")
    return lines + scaling(points)


def scaling(points: list[dict]) -> list[str]:
    """Tensor-parallel scaling: decode tokens/s of each ``<variant>-tpN`` point against the same
    variant's one-GPU point at the same mode and batch; efficiency = speedup / N."""
    lines = []
    for p in points:
        variant, shards = parse_system(p["system"])
        one = next((q for q in points if q["system"] == variant and q["mode"] == p["mode"]
                    and q["batch"] == p["batch"]), None)
        if shards > 1 and one:
            speedup = p["decode_tokens_per_s"] / one["decode_tokens_per_s"]
            lines.append(f"{variant} {p['mode']} batch {p['batch']}: {shards} GPUs {p['decode_tokens_per_s']:.0f} "
                         f"tok/s vs 1 GPU {one['decode_tokens_per_s']:.0f} = {speedup:.2f}x, scaling efficiency "
                         f"{speedup / shards:.0%}")
    return lines


def table(result: dict) -> str:
    rows = ["| system | mode | batch | weights GiB | decode tokens/s | decode ms/step | mean decode batch | "
            "prompt phase: prompt tokens/s |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for p in result["points"]:
        if "skipped" in p:
            rows.append(f"| {p['system']} | {p['mode']} | {p['batch']} | | skipped: {p['skipped']} | | | |")
            continue
        weights = f"{p['weights_gib']:.2f}" if "weights_gib" in p else ""
        rows.append(f"| {p['system']} | {p['mode']} | {p['batch']} | {weights} | {p['decode_tokens_per_s']:.0f} | "
                    f"{p['decode_step_ms_mean']:.1f} | {p['decode_batch_mean']:.1f} | "
                    f"{p['prefill_prompt_tokens_per_s']:.0f} |")
    return "\n".join(rows)


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = measured(result["points"])
    systems = list(dict.fromkeys(p["system"] for p in points))
    fig, (ax_tps, ax_ms) = plt.subplots(1, 2, figsize=(13, 5))
    for i, system in enumerate(systems):
        color = f"C{i}"
        line = sorted((p for p in points if p["system"] == system and p["mode"] == "unbounded"),
                      key=lambda p: p["batch"])
        if line:
            xs = [p["batch"] for p in line]
            ax_tps.plot(xs, [p["decode_tokens_per_s"] for p in line], "o-", color=color, label=system)
            ax_ms.plot(xs, [p["decode_step_ms_mean"] for p in line], "o-", color=color, label=system)
        for p in points:
            if p["system"] == system and p["mode"] != "unbounded":
                ax_tps.plot([p["batch"]], [p["decode_tokens_per_s"]], "*", color=color, markersize=16,
                            markeredgecolor="black")
    ax_tps.plot([], [], "*", color="gray", markersize=12, markeredgecolor="black",
                label=f"largest wave within {result['budget_gib']:g} GiB")
    ax_ms.axhline(100, color="gray", linestyle="--", label="100 ms target")
    for ax, ylabel in ((ax_tps, "generated tokens/s (decode steps)"), (ax_ms, "decode step latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch (requests in the wave)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    c = result["config"]
    fig.suptitle(f"Llama shapes (hidden {c['hidden_size']}, {c['num_hidden_layers']} layers), random weights, "
                 f"ShareGPT-like lengths, {result['device']}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


#: What must agree between runs whose points are merged into one study.
_SAME_SETUP = ("config", "seed", "decode_steps", "budget_gib", "distribution", "device")


def merge_runs(paths: list[Path]) -> dict:
    """One result from several runs of the same setup (e.g. a second run for the points the first
    skipped at its time limit): a measured point replaces a skipped one of the same system, mode
    and batch; batch sizes are united."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    merged = {**runs[0], "points": [], "batch_sizes": sorted({b for r in runs for b in r["batch_sizes"]}),
              "runs": [{"file": Path(p).name, "seconds": r.get("seconds")} for p, r in zip(paths, runs)]}
    by_key: dict[tuple, dict] = {}
    for path, run in zip(paths, runs):
        differ = [k for k in _SAME_SETUP if run.get(k) != runs[0].get(k)]
        if differ:
            raise UserError(f"{path}: {', '.join(differ)} differ from {paths[0]}'s; merge only runs of one setup")
        for point in run["points"]:
            key = (point["system"], point["mode"], point["batch"])
            if key not in by_key or "skipped" in by_key[key]:
                by_key[key] = point
    merged["points"] = list(by_key.values())
    return merged


def cmd_report(args) -> None:
    result = merge_runs(args.json)
    if args.merged:
        args.merged.write_text(json.dumps(result, indent=1))
    print(table(result))
    print()
    for line in verdict(result):
        print(f"- {line}")
    if args.png:
        plot(result, args.png)
        print(f"wrote {args.png}")


# --- command line --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/e2e.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="compile the variants' libraries (no weights)")
    b.add_argument("-o", "--output", type=Path, required=True, help="directory of the packages")
    b.add_argument("--target", default="cuda", help="llvm or cuda (default cuda)")
    b.add_argument("--arch", default="sm_90a", help="CUDA arch(s) (default sm_90a)")
    b.add_argument("--variants", default=",".join(VARIANTS), help=f"comma separated, of {', '.join(VARIANTS)}")
    b.add_argument("--config", help="a Hugging Face config.json to build instead of --shapes")
    b.add_argument("--shapes", default="llama-2-7b", choices=sorted(SHAPES), help="model shapes (default llama-2-7b)")
    b.add_argument("--tensor-parallel-shards", type=int, default=1,
                   help="build each variant for N GPUs (packages <variant>-tpN)")
    b.add_argument("--prefill-chunk-size", type=int, default=512)
    b.add_argument("--context-window-size", type=int, default=2048)
    r = sub.add_parser("run", help="measure the packages and HF transformers; write JSON")
    r.add_argument("--packages", type=Path, required=True, help="the build's output directory")
    r.add_argument("-o", "--output", type=Path, required=True, help="JSON file to write")
    r.add_argument("--device", default="cuda", help="cuda or cpu")
    r.add_argument("--systems", default="atom-w4a4,fp16,w8a8,hf-fp16,w4a16,fp16-kv4",
                   help="what to measure, in this order: hf-fp16 and the built variants")
    r.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)))
    r.add_argument("--decode-steps", type=int, default=16, help="decode steps timed per point")
    r.add_argument("--budget-gib", type=float, default=24.0, help="memory budget for weights + KV cache")
    r.add_argument("--max-prompt", type=int, default=MAX_PROMPT)
    r.add_argument("--max-output", type=int, default=MAX_OUTPUT)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--time-limit", type=float, default=230.0,
                   help="seconds; points not started by then are recorded as skipped")
    t = sub.add_parser("report", help="markdown table, verdict and PNG from a run's JSON")
    t.add_argument("json", type=Path, nargs="+", help="one run's JSON, or several runs of one setup to merge")
    t.add_argument("--merged", type=Path, help="write the merged JSON here")
    t.add_argument("--png", type=Path)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    commands = {"build": cmd_build, "run": cmd_run, "report": cmd_report}
    return run_command(lambda: commands[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
