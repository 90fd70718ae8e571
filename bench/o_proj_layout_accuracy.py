"""Accuracy of o_proj's two outlier layouts (`atom_tvm.quantization.reorder`), in simulation.

* ``gathered`` (Atom's paper): o_proj's INT4 part is its input with the outlier channels taken
  out, in groups of the remaining channels; the INT8 block holds the outliers. Its quantizer
  gathers the row through a runtime index (`tir_kernels.quantize.reorder_quantize`).
* ``masked`` (the default of `python -m atom_tvm.quantize` since layout 3): o_proj's INT4 part
  spans all its input channels in order with the outlier channels zeroed (so they stay out of
  their groups' absmax), the INT8 block holds the same outliers; o_proj becomes a Linear of K + O
  inputs and its quantizer reads rows in order (`outlier_mask_quantize`).

Both with the default `atom-w4a4` preset otherwise (shared residual order, GPTQ, INT4 KV), one
calibration for both; per-window NLL differences paired as in `bench/rmsnorm_variants_accuracy.py`.

    python bench/o_proj_layout_accuracy.py --model models/SmolLM2-135M-Instruct --group-size 64 \\
        --eval-windows 64 --json docs/bench/o_proj_layout_accuracy.json
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atom_tvm.ablation import evaluate_study_row, finish_study, parse_study_arguments  # noqa: E402
from atom_tvm.datasets import calibration_source, held_out_windows  # noqa: E402
from atom_tvm.quantization.calibrate import calibrate, load_float_model  # noqa: E402
from atom_tvm.quantization.simulate import preset, simulate  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args = parse_study_arguments(__doc__.split("\n")[0], argv)

    configs = {layout: preset("atom-w4a4", group_size=args.group_size, n_outliers=args.n_outliers,
                              o_proj_outliers=layout) for layout in ("gathered", "masked")}
    windows = held_out_windows(args.model, args.text, args.window, args.eval_windows)
    calib_text, calib_split = calibration_source(args.text)
    stats = None
    rows = []
    for layout, cfg in configs.items():
        t0 = time.perf_counter()
        model = load_float_model(args.model)
        if stats is None:
            stats = calibrate(args.model, calib_text, calib_split, args.calib_windows,
                              args.calib_window_length, hessian=True, model=model)
        simulate(model, cfg, stats)
        rows.append(evaluate_study_row(f"o_proj outliers {layout}", model, windows, t0))

    finish_study(args, configs["gathered"], windows, stats.info, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
