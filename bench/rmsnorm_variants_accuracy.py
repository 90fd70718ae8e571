"""Accuracy of two changes to Atom's algorithm that would make the RMSNorm quantizer cheaper.

The fused RMSNorm + reorder + quantize kernel misses its bandwidth target on the H200 because of
its per-element work (docs/bench/quantize_kernels.md): a gather through each layer's own reorder
index, two multiplies (1/rms, then the norm weight) before the group absmax. Two changes would
remove most of it, but each changes what Atom quantizes, so this measures what each costs in
perplexity (simulated, as `python -m atom_tvm.ablation` does, on the same windows):

* ``fold-norm``: every decoder norm's weight folded into the columns of the Linears it feeds
  (q/k/v, gate/up), the norm weights set to 1. Exact in real arithmetic; but the activations
  quantized are then ``x * rs``, not ``x * rs * w``, so outliers and groups are chosen and
  quantized on other values (calibration runs on the folded model). The kernel would compute its
  INT4 codes from the stored ``x`` alone and apply 1/rms to the scales.
* ``one-order``: one channel order for the whole residual stream: the attention and MLP inputs of
  every layer share a permutation, chosen on the sum over all those sites of their calibration
  sum of squares (each normalized to sum 1, so no layer dominates). The residual stream is then
  stored in that order and the kernel reads rows in order, like SiLU-mul. (Adopted after this
  study: it is `reorder`'s "shared" residual order, the default of `python -m atom_tvm.quantize`.)

Rows: ``atom-w4a4`` (the paper's per-layer orders, what packages ran when this was measured), the
two changes, and both.
Each row also gives its mean per-token NLL minus atom-w4a4's with the standard error of that
difference over the windows (paired: the same windows), to tell a change from noise.

    python bench/rmsnorm_variants_accuracy.py --model models/SmolLM2-135M-Instruct --group-size 64 \\
        --json docs/bench/rmsnorm_variants_accuracy.json
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atom_tvm.ablation import evaluate_study_row, finish_study, parse_study_arguments  # noqa: E402
from atom_tvm.datasets import calibration_source, held_out_windows  # noqa: E402
from atom_tvm.quantization.calibrate import calibrate, load_float_model  # noqa: E402
from atom_tvm.quantization.simulate import preset, simulate  # noqa: E402

#: Norm-fed sites: (site, the norm that produces it, the Linears that read it).
NORM_SITES = (
    ("attn_in", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("mlp_in", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
)
ROWS = ("atom-w4a4", "fold-norm", "one-order", "fold-norm + one-order")


def fold_norm_weights(model) -> None:
    """Scale each norm-fed Linear's input columns by its norm's weight and set that weight to 1."""
    import torch

    with torch.no_grad():
        for layer in model.model.layers:
            for _, norm_name, linears in NORM_SITES:
                norm = getattr(layer, norm_name)
                for name in linears:
                    linear = layer.get_submodule(name)
                    linear.weight.mul_(norm.weight[None, :])
                norm.weight.fill_(1.0)


def main(argv: list[str] | None = None) -> int:
    args = parse_study_arguments(__doc__.split("\n")[0], argv)

    cfg = preset("atom-w4a4", group_size=args.group_size, n_outliers=args.n_outliers)
    orders = {False: dataclasses.replace(cfg, residual_order="per-layer"), True: cfg}
    windows = held_out_windows(args.model, args.text, args.window, args.eval_windows)
    calib_text, calib_split = calibration_source(args.text)
    stats = {}
    rows = []
    for row in ROWS:
        fold = row.startswith("fold-norm")
        t0 = time.perf_counter()
        model = load_float_model(args.model)
        if fold:
            fold_norm_weights(model)
        if fold not in stats:  # calibrate the model that is quantized: folded or not
            stats[fold] = calibrate(args.model, calib_text, calib_split, args.calib_windows,
                                    args.calib_window_length, hessian=True, model=model)
        rows.append(evaluate_study_row(row, simulate(model, orders[row.endswith("one-order")], stats[fold]),
                                       windows, t0))

    finish_study(args, cfg, windows, stats[False].info, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
