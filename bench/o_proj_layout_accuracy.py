"""Accuracy of an o_proj input layout that would let its quantizer read rows in order.

o_proj's activation quantizer (`tir_kernels.quantize.reorder_quantize`) is the one quantizer of the
default model that still stages its row in shared memory and gathers it through an index, and
the one furthest from its traffic floor (docs/bench/quantize_kernels.md, session 13). Its gather
only takes the 128 outlier channels out (`reorder.outlier_permutation` keeps the others in order).
This measures, in simulation as `python -m atom_tvm.ablation` does, what leaving them in place
would cost:

* ``atom-w4a4``: o_proj's INT4 part is its input with the outlier channels taken out, in groups of
  the remaining channels; the INT8 block holds the outliers.
* ``o_proj outliers masked``: o_proj's INT4 part spans all H input channels with the outlier
  channels zeroed (so they stay out of their groups' absmax), in groups of aligned original
  channels; the INT8 block holds the same outliers. o_proj becomes a Linear of H + O inputs:
  ``W' = [W * mask, W[:, outliers]]`` fed ``x' = [x * mask, x[:, outliers]]``, exactly ``W x`` in
  real arithmetic. Its calibration statistics are those of the expanded input, derived from the
  original ones (``x' = x E``: sums of squares masked and appended, Hessian ``E^T H E``), so both
  rows quantize with the same calibration and the same outlier channels.

Both with the default `atom-w4a4` preset (shared residual order, GPTQ, INT4 KV); per-window NLL
differences paired as in `bench/rmsnorm_variants_accuracy.py`.

    python bench/o_proj_layout_accuracy.py --model models/SmolLM2-135M-Instruct --group-size 64 \\
        --eval-windows 64 --json docs/bench/o_proj_layout_accuracy.json
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atom_tvm.ablation import evaluate_study_row, finish_study, parse_study_arguments  # noqa: E402
from atom_tvm.datasets import calibration_source, held_out_windows  # noqa: E402
from atom_tvm.quantization.calibrate import CalibrationStats, calibrate, load_float_model  # noqa: E402
from atom_tvm.quantization.reorder import SITE_LINEARS, outlier_permutation  # noqa: E402
from atom_tvm.quantization.simulate import preset, simulate  # noqa: E402

ROWS = ("atom-w4a4", "o_proj outliers masked")


def o_proj_outliers(stats: CalibrationStats, n_layers: int, n_outliers: int) -> list[np.ndarray]:
    """Each layer's o_proj outlier channels, as `reorder.outlier_permutation` chooses them."""
    return [outlier_permutation(stats.sumsq_for(f"model.layers.{i}.{SITE_LINEARS['o_in']}"), n_outliers)[-n_outliers:]
            for i in range(n_layers)]


def masked_stats(stats: CalibrationStats, outliers: list[np.ndarray]) -> CalibrationStats:
    """``stats`` with every o_proj's statistics those of its expanded input ``x E``: the channels
    ``[0, K) + outliers`` with the outliers' first places zeroed (``E`` only selects and masks, so
    ``E^T H E`` is ``H`` indexed, with those rows and columns zero)."""
    sumsq, hessian = dict(stats.sumsq), dict(stats.hessian)
    for i, outl in enumerate(outliers):
        site = stats.sites[f"model.layers.{i}.{SITE_LINEARS['o_in']}"]
        channels = np.concatenate([np.arange(len(stats.sumsq[site])), outl])
        sumsq[site] = stats.sumsq[site][channels]
        sumsq[site][outl] = 0.0
        if site in stats.hessian:
            hessian[site] = stats.hessian[site][np.ix_(channels, channels)]
            hessian[site][outl, :] = 0.0
            hessian[site][:, outl] = 0.0
    return dataclasses.replace(stats, sumsq=sumsq, hessian=hessian)


def mask_o_proj(model, outliers: list[np.ndarray]) -> list:
    """Make every o_proj a Linear of H + O inputs fed ``[x * mask, x[:, outliers]]`` (module doc);
    returns (o_proj, its input expansion) pairs, for `prepend_expansions` to register."""
    import torch

    expansions = []
    with torch.no_grad():
        for layer, outl in zip(model.model.layers, outliers):
            linear = layer.self_attn.o_proj
            k = linear.in_features
            index = torch.as_tensor(outl)
            mask = torch.ones(k, dtype=linear.weight.dtype)
            mask[index] = 0
            linear.weight = torch.nn.Parameter(torch.cat([linear.weight * mask, linear.weight[:, index]], dim=1))
            linear.in_features = k + len(outl)

            def expand(module, args, mask=mask, index=index):
                x = args[0]
                return (torch.cat([x * mask, x.index_select(-1, index)], dim=-1), *args[1:])

            expansions.append((linear, expand))
    return expansions


def prepend_expansions(expansions: list) -> None:
    """Register the expansions as each o_proj's first pre-hook: simulate() prepends the runtime
    index gather, which must see the expanded input."""
    for linear, expand in expansions:
        linear.register_forward_pre_hook(expand, prepend=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_study_arguments(__doc__.split("\n")[0], argv)

    cfg = preset("atom-w4a4", group_size=args.group_size, n_outliers=args.n_outliers)
    windows = held_out_windows(args.model, args.text, args.window, args.eval_windows)
    calib_text, calib_split = calibration_source(args.text)
    stats = None
    rows = []
    for row in ROWS:
        t0 = time.perf_counter()
        model = load_float_model(args.model)
        if stats is None:
            stats = calibrate(args.model, calib_text, calib_split, args.calib_windows,
                              args.calib_window_length, hessian=True, model=model)
        row_stats = stats
        if row == "o_proj outliers masked":
            outliers = o_proj_outliers(stats, len(model.model.layers), args.n_outliers)
            row_stats = masked_stats(stats, outliers)
            expansions = mask_o_proj(model, outliers)
        simulate(model, cfg, row_stats)
        if row == "o_proj outliers masked":
            prepend_expansions(expansions)
        rows.append(evaluate_study_row(row, model, windows, t0))

    finish_study(args, cfg, windows, stats.info, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
