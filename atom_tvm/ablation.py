"""`python -m atom_tvm.ablation`: the Atom paper's accuracy ablation (its Table 2) on a real model.

    python -m atom_tvm.ablation --model models/SmolLM2-135M-Instruct --group-size 64 -o docs/ablation

Each row adds one technique to the row before (W4A4 RTN, + 128 outlier channels kept in FP16, + those
outliers in INT8, + group quantization, + clipping, + GPTQ, + INT4 KV cache: the paper's Atom), then
atom-tvm's two layout changes (`atom_tvm.quantization.reorder`): + one residual-stream channel order
shared by all layers, + o_proj's outliers masked in place (atom-w4a4: what atom-tvm packages run),
next to the FP baseline and the W8A8 and W4A16 baselines. Calibration (outlier statistics and GPTQ Hessians) runs once on the
train split of the corpus; perplexity is measured on its test split, so the two never share text.
Writes `<out>.md` (table), `<out>.png` (bar chart) and `<out>.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

from atom_tvm.datasets import WIKIPEDIA, calibration_source, held_out_windows
from atom_tvm.errors import UserError, run_command
from atom_tvm.package import write_json_atomic
from atom_tvm.staging import atomic_output

ROWS = ("fp16", "w4a4-rtn", "+outliers-fp16", "+outliers-int8", "+group", "+clip", "+gptq", "+kv4",
        "+shared-order", "atom-w4a4", "w8a8", "w4a16")
LABELS = {
    "fp16": "FP baseline (float32 here)",
    "w4a4-rtn": "W4A4 RTN",
    "+outliers-fp16": "+ 128 outlier channels in FP16",
    "+outliers-int8": "+ outliers quantized to INT8",
    "+group": "+ group quantization (G)",
    "+clip": "+ clipping (0.85 weights, 0.9 activations)",
    "+gptq": "+ GPTQ weights",
    "+kv4": "+ INT4 KV cache (the paper's Atom)",
    "+shared-order": "+ one residual order for all layers",
    "atom-w4a4": "+ o_proj outliers masked in place (atom-w4a4)",
    "w8a8": "W8A8 baseline (per channel / per token)",
    "w4a16": "W4A16 baseline (groups of G)",
}


def row_config(name: str, group_size: int, n_outliers: int):
    """The preset, with the model-specific group size and outlier count where the preset uses them."""
    from atom_tvm.quantization.simulate import preset

    base = preset(name)
    return dataclasses.replace(base, group_size=group_size if base.group_size else 0,
                               n_outliers=n_outliers if base.n_outliers else 0)


def run(args: argparse.Namespace) -> dict:
    from atom_tvm.eval import hf_window_logits, perplexity
    from atom_tvm.quantization.calibrate import calibrate, load_float_model
    from atom_tvm.quantization.simulate import simulate

    configs = [row_config(name, args.group_size, args.n_outliers) for name in ROWS]
    for cfg in configs:
        cfg.validate()
    windows = held_out_windows(args.model, args.text, args.window, args.eval_windows)
    calib_text, calib_split = calibration_source(args.text)
    t0 = time.perf_counter()
    stats = calibrate(args.model, calib_text, calib_split, args.calib_windows, args.calib_window_length,
                      hessian=True)
    print(f"calibrated in {time.perf_counter() - t0:.0f}s", flush=True)
    rows = []
    for name, cfg in zip(ROWS, configs):
        t0 = time.perf_counter()
        model = simulate(load_float_model(args.model), cfg, stats if cfg.needs_calibration else None)
        result = perplexity(hf_window_logits(model), windows)
        rows.append({"row": name, "label": LABELS[name], "config": dataclasses.asdict(cfg), **result,
                     "seconds": time.perf_counter() - t0})
        print(f"{LABELS[name]:45s} ppl {result['ppl']:10.3f}", flush=True)
    return {"model": str(args.model), "text": str(args.text), "group_size": args.group_size,
            "n_outliers": args.n_outliers, "calibration": stats.info,
            "evaluation": {"split": "test", "windows": int(windows.shape[0]), "window": args.window},
            "command": "python -m atom_tvm.ablation " + " ".join(sys.argv[1:]), "rows": rows}


def write_markdown(report: dict, path: Path) -> None:
    fp = report["rows"][0]["ppl"]
    lines = [
        f"# Atom ablation on {Path(report['model']).name}",
        "",
        f"Perplexity on {report['evaluation']['windows']} windows of {report['evaluation']['window']} tokens "
        f"from the test split of `{report['text']}`; calibration on {report['calibration']['windows']} windows of "
        f"{report['calibration']['window_length']} tokens from the train split (disjoint articles). "
        f"Group size G = {report['group_size']}, {report['n_outliers']} outlier channels. Simulated "
        "(quantize-dequantize in float, the kernels' exact formats).",
        "",
        f"Command: `{report['command']}`",
        "",
        "| configuration | perplexity | vs FP |",
        "| --- | ---: | ---: |",
    ]
    for row in report["rows"]:
        lines.append(f"| {row['label']} | {row['ppl']:.2f} | {row['ppl'] / fp:.2f}x |")
    path.write_text("\n".join(lines) + "\n")


def write_chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    colors = ["#777777"] + ["#3b6ea8"] * 7 + ["#c07a2c"] * 2
    ax.bar(range(len(rows)), [r["ppl"] for r in rows], color=colors)
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)), [r["row"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(f"Atom ablation, {Path(report['model']).name}, G={report['group_size']}")
    for i, r in enumerate(rows):
        ax.text(i, r["ppl"], f"{r['ppl']:.1f}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def add_study_arguments(p: argparse.ArgumentParser, calib_windows: int) -> None:
    """The options of a simulated perplexity study (this one, and the bench studies built like it):
    model, corpus, Atom layout, evaluation and calibration windows."""
    p.add_argument("--model", required=True, type=Path, help="Hugging Face model directory")
    p.add_argument("--text", default=WIKIPEDIA, help="corpus: 'wikipedia', a corpus dir or a file with a train sibling")
    p.add_argument("--group-size", type=int, default=128, help="64 or 128 (SmolLM2 needs 64)")
    p.add_argument("--n-outliers", type=int, default=128)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--calib-windows", type=int, default=calib_windows)
    p.add_argument("--calib-window-length", type=int, default=512)


def evaluate_study_row(row: str, model, windows, started: float) -> dict:
    """One row of a bench study built like this one: the simulated ``model``'s mean per-token NLL on
    each window (kept, so that rows can be compared window by window) and their perplexity."""
    from atom_tvm.eval import hf_window_logits, window_nll

    logits = hf_window_logits(model)
    nll = [window_nll(logits(ids), ids) / (len(ids) - 1) for ids in windows]
    result = {"row": row, "ppl": math.exp(sum(nll) / len(nll)), "window_nll": nll,
              "seconds": round(time.perf_counter() - started, 1)}
    print(f"{row:24s} ppl {result['ppl']:8.3f}", flush=True)
    return result


def parse_study_arguments(description: str, argv: list[str] | None) -> argparse.Namespace:
    """The command line of a bench study built like this one: `add_study_arguments` (16 calibration
    windows) and ``--json``."""
    p = argparse.ArgumentParser(description=description)
    add_study_arguments(p, calib_windows=16)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    return p.parse_args(argv)


def finish_study(args: argparse.Namespace, cfg, windows, calibration: dict, rows: list[dict]) -> None:
    """Print a bench study's rows against its first (`print_paired_differences`) and write its JSON
    report where ``--json`` says."""
    print_paired_differences(rows)
    if args.json:
        report = {"model": str(args.model), "text": str(args.text), "config": dataclasses.asdict(cfg),
                  "evaluation": {"split": "test", "windows": int(windows.shape[0]), "window": args.window},
                  "calibration": calibration, "command": "python " + " ".join(sys.argv), "rows": rows}
        write_json_atomic(args.json, report)


def print_paired_differences(rows: list[dict]) -> None:
    """Each study row against the first: perplexity change, and the mean per-token NLL difference with
    its standard error over the windows (paired: the same windows), to tell a change from noise.
    Stores ``nll_diff`` and ``nll_diff_se`` in the rows."""
    base = rows[0]
    print(f"\n{'variant':24s} {'ppl':>8s} {'vs ' + base['row']:>13s} {'NLL diff +- s.e.':>20s}")
    for r in rows:
        diff = [a - b for a, b in zip(r["window_nll"], base["window_nll"])]
        mean = sum(diff) / len(diff)
        se = math.sqrt(sum((d - mean) ** 2 for d in diff) / (len(diff) - 1) / len(diff))
        r["nll_diff"], r["nll_diff_se"] = mean, se
        print(f"{r['row']:24s} {r['ppl']:8.3f} {100 * (r['ppl'] / base['ppl'] - 1):+12.2f}% "
              f"{mean:+10.4f} +- {se:.4f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m atom_tvm.ablation", description=__doc__.split("\n")[0])
    add_study_arguments(p, calib_windows=32)
    p.add_argument("-o", "--output", type=Path, default=Path("docs/ablation"), help="path prefix of the outputs")
    args = p.parse_args(argv)

    def work():
        if not (args.model / "config.json").is_file():
            raise UserError(f"{args.model}: not a Hugging Face model directory (no config.json)")
        report = run(args)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.output.with_suffix(".json"), report)
        for suffix, writer in ((".md", write_markdown), (".png", write_chart)):
            with atomic_output(args.output.with_suffix(suffix)) as tmp:
                writer(report, tmp)
        print(f"wrote {args.output}.md, .png, .json")

    return run_command(work)


if __name__ == "__main__":
    sys.exit(main())
