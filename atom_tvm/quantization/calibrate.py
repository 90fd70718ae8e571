"""Calibration: activation statistics of the float model at the input of every decoder Linear.

Atom picks its outlier channels by the sum of squares of each input channel (the diagonal of the
input Hessian X^T X, which GPTQ needs whole). This module runs the float Hugging Face model over N
windows of L tokens of calibration text (the paper: 128 x 2048 random windows of the training
split) with a forward pre-hook on every nn.Linear of the decoder layers, accumulating in float64

* ``sumsq[site]``   per input channel, sum over tokens of x^2;
* ``hessian[site]`` X^T X (only with ``hessian=True``: K^2 per site, 0.8 GB for SmolLM2).

Linears that read the same tensor (q/k/v, gate/up) share one *site*, named after the first of
them, so the shared statistics are computed and stored once.

    python -m atom_tvm.quantization.calibrate --model models/SmolLM2-135M-Instruct \
        --text wikipedia --windows 128 --window-length 2048 [--hessian] -o stats.npz
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import TextIO

import numpy as np

from atom_tvm.datasets import WIKIPEDIA, atomic_output, encode, load_text, token_windows
from atom_tvm.errors import UserError, run_command

DEFAULT_WINDOWS = 128
DEFAULT_WINDOW_LENGTH = 2048
DEFAULT_SEED = 0


class ProgressLine:
    """A plain-text progress bar: one stderr line rewritten in place with ``\\r``."""

    def __init__(self, label: str, total: int, unit: str = "windows", stream: TextIO | None = None):
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream or sys.stderr  # looked up now: tests and callers may swap sys.stderr
        self.t0 = time.perf_counter()

    def update(self, done: int, tokens: int | None = None) -> None:
        elapsed = time.perf_counter() - self.t0
        filled = 30 * done // self.total
        rate = f", {tokens / max(elapsed, 1e-9):,.0f} tok/s" if tokens is not None else ""
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total} "
                          f"{self.unit}{rate}, {elapsed:.1f}s")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


@dataclasses.dataclass
class CalibrationStats:
    """Per-site activation statistics; ``sites`` maps every hooked Linear's name to its site."""

    sumsq: dict[str, np.ndarray]
    hessian: dict[str, np.ndarray]
    sites: dict[str, str]
    n_tokens: int
    info: dict = dataclasses.field(default_factory=dict)

    def sumsq_for(self, linear: str) -> np.ndarray:
        return self.sumsq[self._site(linear)]

    def hessian_for(self, linear: str) -> np.ndarray:
        site = self._site(linear)
        if site not in self.hessian:
            raise UserError(f"calibration statistics have no Hessian for {linear}; "
                            "recalibrate with --hessian (GPTQ needs it)")
        return self.hessian[site]

    def _site(self, linear: str) -> str:
        if linear not in self.sites:
            raise UserError(f"calibration statistics have nothing for {linear}; were they collected "
                            f"on this model? ({self.info.get('model', 'unknown model')})")
        return self.sites[linear]

    def save(self, path: Path | str) -> None:
        """Write an .npz atomically: arrays under ``sumsq:SITE``/``hessian:SITE``, the rest as JSON."""
        arrays = {f"sumsq:{k}": v for k, v in self.sumsq.items()}
        arrays.update({f"hessian:{k}": v for k, v in self.hessian.items()})
        meta = {"sites": self.sites, "n_tokens": self.n_tokens, "info": self.info}
        with atomic_output(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)), **arrays)

    @classmethod
    def load(cls, path: Path | str) -> "CalibrationStats":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: calibration statistics not found; make them with "
                            "python -m atom_tvm.quantization.calibrate")
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                tables: dict[str, dict[str, np.ndarray]] = {"sumsq": {}, "hessian": {}}
                for key in z.files:
                    kind, _, site = key.partition(":")
                    if kind in tables:
                        tables[kind][site] = z[key]
        except (OSError, ValueError, KeyError) as err:
            raise UserError(f"{path}: not a calibration statistics file ({err})") from None
        return cls(tables["sumsq"], tables["hessian"], meta["sites"], meta["n_tokens"], meta["info"])


def load_float_model(model_dir: Path | str, device: str = "cpu"):
    """The Hugging Face causal LM of ``model_dir`` in float32, in eval mode, on ``device``."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()  # its per-tensor loading bar would bury our own progress line
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir}: not a Hugging Face model directory (no config.json); "
                        "python -m atom_tvm.convert_gguf writes one for the bundled SmolLM2")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: torch sees no CUDA GPU; use --device cpu")
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise UserError(f"{model_dir}: transformers cannot load it ({err})") from None
    return model.eval().to(device)


def decoder_linears(model) -> dict[str, "torch.nn.Linear"]:
    """Every nn.Linear inside the decoder layers, by module name (lm_head and embeddings excluded)."""
    import torch

    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise UserError(f"{type(model).__name__} has no model.layers; only Llama-style decoders are supported")
    return {f"model.layers.{i}.{name}": module
            for i, layer in enumerate(layers)
            for name, module in layer.named_modules() if isinstance(module, torch.nn.Linear)}


class _Collector:
    """Pre-hooks accumulating per-site statistics on the model's device in float64."""

    def __init__(self, hessian: bool):
        self.want_hessian = hessian
        self.sumsq: dict = {}
        self.hessian: dict = {}
        self.sites: dict[str, str] = {}
        # The tensor the previous hook saw, kept alive so identity means "the same input".
        self._last_input = None
        self._last_site = ""

    def hook(self, name: str):
        def pre_hook(module, args):
            x = args[0]
            if x is self._last_input:  # k/v after q, up after gate: same tensor, same statistics
                self.sites[name] = self._last_site
                return
            self._last_input, self._last_site = x, name
            self.sites[name] = name
            flat = x.detach().reshape(-1, x.shape[-1]).double()
            if name not in self.sumsq:
                self.sumsq[name] = flat.new_zeros(flat.shape[-1])
                if self.want_hessian:
                    self.hessian[name] = flat.new_zeros(flat.shape[-1], flat.shape[-1])
            self.sumsq[name] += flat.square().sum(0)
            if self.want_hessian:
                self.hessian[name].addmm_(flat.T, flat)
        return pre_hook

    def end_window(self) -> None:
        self._last_input = None


def collect_stats(model, windows: np.ndarray, hessian: bool = False,
                  progress: ProgressLine | None = None) -> CalibrationStats:
    """Run ``model`` over ``windows`` [n, L] (one at a time) and return the statistics."""
    import torch

    collector = _Collector(hessian)
    handles = [m.register_forward_pre_hook(collector.hook(name)) for name, m in decoder_linears(model).items()]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for i, window in enumerate(windows):
                model(input_ids=torch.as_tensor(window[None], device=device), use_cache=False)
                collector.end_window()
                if progress:
                    progress.update(i + 1, (i + 1) * windows.shape[1])
    finally:
        for h in handles:
            h.remove()
        if progress:
            progress.close()
    return CalibrationStats(
        sumsq={k: v.cpu().numpy() for k, v in collector.sumsq.items()},
        hessian={k: v.cpu().numpy() for k, v in collector.hessian.items()},
        sites=collector.sites, n_tokens=int(windows.size))


def calibration_windows(model_dir: Path | str, text: str, n_windows: int, length: int,
                        seed: int = DEFAULT_SEED) -> np.ndarray:
    """``n_windows`` random non-overlapping token windows of ``length`` (fewer, with a warning,
    if the text is short; none at all is a UserError)."""
    if n_windows < 1:
        raise UserError(f"--windows {n_windows}: needs at least 1")
    windows = token_windows(encode(Path(model_dir) / "tokenizer.json", text), length, n_windows, seed)
    if len(windows) < n_windows:
        print(f"warning: the calibration text holds only {len(windows)} windows of {length} tokens; "
              f"calibrating on those instead of {n_windows}", file=sys.stderr)
    return windows


def calibrate(model_dir: Path | str, text_source: str = WIKIPEDIA, split: str = "train",
              n_windows: int = DEFAULT_WINDOWS, length: int = DEFAULT_WINDOW_LENGTH,
              hessian: bool = False, device: str = "cpu", seed: int = DEFAULT_SEED, model=None,
              progress: bool = True) -> CalibrationStats:
    """Statistics of the model in ``model_dir`` (or the already loaded ``model``) on calibration text."""
    if not Path(model_dir).is_dir():
        raise UserError(f"{model_dir}: model directory not found; pass a Hugging Face model directory")
    windows = calibration_windows(model_dir, load_text(text_source, split), n_windows, length, seed)
    if model is None:
        model = load_float_model(model_dir, device)
    bar = ProgressLine("calibrate", len(windows)) if progress else None
    stats = collect_stats(model, windows, hessian, bar)
    stats.info = {"model": str(model_dir), "text": str(text_source), "split": split,
                  "windows": len(windows), "window_length": length, "seed": seed}
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m atom_tvm.quantization.calibrate",
                                description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, type=Path, help="Hugging Face model directory")
    p.add_argument("--text", default=WIKIPEDIA, help="calibration text: a file, 'wikipedia' or a corpus dir")
    p.add_argument("--split", default="train", choices=("train", "test"), help="split of --text (default train)")
    p.add_argument("--windows", type=int, default=DEFAULT_WINDOWS, help="number of token windows")
    p.add_argument("--window-length", type=int, default=DEFAULT_WINDOW_LENGTH, help="tokens per window")
    p.add_argument("--hessian", action="store_true", help="also collect X^T X per site (for GPTQ)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="window sampling seed")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("-o", "--output", required=True, type=Path, help="statistics file (.npz) to write")
    args = p.parse_args(argv)

    def run():
        if args.output.is_dir():
            raise UserError(f"{args.output}: is a directory; pass a file name such as stats.npz")
        if args.output.suffix != ".npz":
            raise UserError(f"{args.output}: the statistics file must end in .npz")
        stats = calibrate(args.model, args.text, args.split, args.windows, args.window_length,
                          args.hessian, args.device, args.seed)
        stats.save(args.output)
        print(f"{args.output}: {len(stats.sumsq)} sites over {stats.n_tokens:,} tokens"
              f"{' with Hessians' if stats.hessian else ''}")

    return run_command(run)

if __name__ == "__main__":
    sys.exit(main())
