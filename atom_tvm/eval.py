"""`python -m atom_tvm.eval ppl`: perplexity of a float/simulated model or of a compiled package.

    python -m atom_tvm.eval ppl --model models/SmolLM2-135M-Instruct --quantization atom-w4a4 \
        --group-size 64 --text wikipedia --window 512 --max-windows 20 --calib-windows 32
    python -m atom_tvm.eval ppl --model dist/smollm2-fp32-llvm --text data/wiki.test.txt --json ppl.json

Perplexity is exp(mean NLL) over non-overlapping windows of ``--window`` tokens, each scored from
scratch (every token but a window's first is predicted from the tokens before it in the window).

``--model`` is either

* a Hugging Face directory: the float model in transformers, simulated with a preset from
  `atom_tvm.quantization.simulate` (``--quantization``); presets that reorder outliers or run GPTQ
  calibrate first on the *train* split of the corpus (``--calib-text`` to choose another text),
  while perplexity is measured on the *test* split, so the two never share text; or
* a compiled package (it has mlc-chat-config.json): its library's ``batch_prefill`` returns logits
  at every position, in chunks of at most the package's prefill chunk size.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from atom_tvm.datasets import WIKIPEDIA, calibration_source, held_out_windows
from atom_tvm.errors import UserError, run_command
from atom_tvm.package import CHAT_CONFIG, read_chat_config, write_json_atomic
from atom_tvm.quantization.calibrate import ProgressLine

WindowLogits = Callable[[np.ndarray], np.ndarray]  # token ids [n] -> float32 logits [n, vocab]


def window_nll(logits: np.ndarray, ids: np.ndarray) -> float:
    """Sum of -log p(ids[t+1] | ids[..t]) over a window, in float64."""
    pred = np.asarray(logits[:-1], np.float64)
    peak = pred.max(axis=-1)
    log_z = peak + np.log(np.exp(pred - peak[:, None]).sum(axis=-1))
    return float(np.sum(log_z - pred[np.arange(len(pred)), ids[1:]]))


def perplexity(window_logits: WindowLogits, windows: np.ndarray, progress: bool = True) -> dict:
    """{"ppl", "nll", "tokens", "windows"} of ``window_logits`` over ``windows`` [n, L]."""
    bar = ProgressLine("ppl", len(windows)) if progress else None
    nll = 0.0
    try:
        for i, ids in enumerate(windows):
            nll += window_nll(window_logits(ids), ids)
            if bar:
                bar.update(i + 1, (i + 1) * windows.shape[1])
    finally:
        if bar:
            bar.close()
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    return {"ppl": float(np.exp(nll / tokens)), "nll": nll / tokens, "tokens": tokens, "windows": len(windows)}


def hf_window_logits(model) -> WindowLogits:
    """Logits of a transformers causal LM, one window per forward pass, no cache."""
    import torch

    device = next(model.parameters()).device

    def logits(ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = model(input_ids=torch.as_tensor(ids[None], device=device), use_cache=False)
        return out.logits[0].float().cpu().numpy()
    return logits


def package_window_logits(chat) -> WindowLogits:
    """Logits of a compiled package (a loaded ChatModel) at every position of a window, each window
    from an empty cache (the window goes in chunks of at most the package's prefill chunk size)."""

    def logits(ids: np.ndarray) -> np.ndarray:
        chat.reset()
        return chat.prefill_every_position([int(t) for t in ids])
    return logits


def is_package(model: Path) -> bool:
    return (Path(model) / CHAT_CONFIG).is_file()


def hf_model_for(args: argparse.Namespace, report: dict):
    """The transformers model of ``args.model``, simulated with the chosen preset (calibrating first
    when the preset needs it); records the calibration in ``report``."""
    from atom_tvm.quantization.calibrate import CalibrationStats, calibrate, load_float_model
    from atom_tvm.quantization.simulate import preset, simulate

    cfg = preset(args.quantization or "fp16", group_size=args.group_size, n_outliers=args.n_outliers,
                 kv_bits=args.kv_bits)
    report["config"] = dataclasses.asdict(cfg)
    stats = calib = None
    if cfg.needs_calibration and args.stats:
        stats = CalibrationStats.load(args.stats)
        report["calibration"] = {"stats": str(args.stats), **stats.info}
    elif cfg.needs_calibration:  # resolved before the slow model load, so a bad source fails fast
        calib = (args.calib_text, "train") if args.calib_text else calibration_source(args.text)
    model = load_float_model(args.model, args.device)
    if calib:
        stats = calibrate(args.model, *calib, args.calib_windows, args.calib_window_length,
                          hessian=cfg.gptq, model=model)
        report["calibration"] = stats.info
    return simulate(model, cfg, stats)


def run_ppl(args: argparse.Namespace) -> dict:
    """Evaluate as the ``ppl`` command describes; returns the JSON report."""
    model = Path(args.model)
    if not model.is_dir():
        raise UserError(f"{model}: no such model directory; pass a Hugging Face directory or a package "
                        "from python -m atom_tvm.build")
    # The test split of a corpus (a plain file is read whole), tokenized before anything slow.
    windows = held_out_windows(model, args.text, args.window, args.max_windows)
    report = {"model": str(model), "text": str(args.text), "window": args.window}
    if is_package(model):
        from atom_tvm.runtime.engine import ChatModel

        config = read_chat_config(model)
        built = config.get("quantization")
        if args.quantization and args.quantization != built:
            raise UserError(f"{model} was built with --quantization {built}; a package's quantization is "
                            f"fixed at build time (omit --quantization or pass {built})")
        if args.window > config["context_window_size"]:
            raise UserError(f"--window {args.window} exceeds the package's context window "
                            f"({config['context_window_size']}); pass a smaller --window")
        if args.kv_bits is not None:
            raise UserError(f"--kv-bits is for simulations; {model}'s KV cache ({config.get('kv_cache', 'tvm')}) "
                            "is fixed at build time (python -m atom_tvm.build --kv-cache)")
        report.update(kind="package", quantization=built, kv_cache=config.get("kv_cache", "tvm"))
        logits = package_window_logits(ChatModel(model, args.device))
    else:
        report.update(kind="hf", quantization=args.quantization or "fp16")
        logits = hf_window_logits(hf_model_for(args, report))
    report.update(perplexity(logits, windows))
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m atom_tvm.eval", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    ppl = sub.add_parser("ppl", help="perplexity over non-overlapping windows")
    ppl.add_argument("--model", required=True, type=Path, help="Hugging Face directory or compiled package")
    ppl.add_argument("--quantization", default=None,
                     help="simulation preset for a Hugging Face model (default fp16, i.e. float)")
    ppl.add_argument("--text", default=WIKIPEDIA, help="evaluation text: a file, 'wikipedia' or a corpus dir")
    ppl.add_argument("--window", type=int, default=512, help="tokens per window (default 512)")
    ppl.add_argument("--max-windows", type=int, default=None, help="evaluate at most this many windows")
    ppl.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ppl.add_argument("--group-size", type=int, default=None, help="override the preset's group size (64, 128, 0)")
    ppl.add_argument("--n-outliers", type=int, default=None, help="override the preset's outlier channel count")
    ppl.add_argument("--kv-bits", type=int, default=None,
                     help="override the preset's KV cache bits (4, 8 or 16) in a simulation")
    ppl.add_argument("--calib-text", default=None, help="calibration text (default: the train split of --text)")
    ppl.add_argument("--calib-windows", type=int, default=128, help="calibration windows (default 128)")
    ppl.add_argument("--calib-window-length", type=int, default=2048, help="calibration window length")
    ppl.add_argument("--stats", type=Path, default=None,
                     help="calibration statistics from python -m atom_tvm.quantization.calibrate")
    ppl.add_argument("--json", type=Path, default=None, help="also write the result as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run():
        if args.max_windows is not None and args.max_windows < 1:
            raise UserError(f"--max-windows {args.max_windows}: needs at least 1")
        report = run_ppl(args)
        if args.json:
            write_json_atomic(args.json, report)
        print(f"ppl {report['ppl']:.4f} ({report['quantization']}, {report['windows']} windows x {args.window} "
              f"tokens of {args.text})")

    return run_command(run)

if __name__ == "__main__":
    sys.exit(main())
