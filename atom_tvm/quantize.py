"""`python -m atom_tvm.quantize`: Atom's offline recipe, writing the tensors the W4A4 kernels read.

    python -m atom_tvm.quantize --model models/SmolLM2-135M-Instruct --group-size 64 \
        --calib-windows 128 --calib-window-length 2048 -o models/SmolLM2-135M-Instruct-atom

Calibrate on text (outlier statistics, and Hessians for GPTQ) -> reorder each activation site's
largest channels to the end -> quantize every decoder Linear (INT4 groups + INT8 outliers, clipped,
GPTQ by default) -> write an *Atom checkpoint* directory (layout in docs/design.md):

- `model.safetensors`: per layer the fused `self_attn.qkv_proj`, `self_attn.o_proj`, `mlp.gate_up_proj`,
  `mlp.down_proj` as `.q4` (uint8, two INT4 per byte), `.s4` (fp16 group scales), `.q8` (int8 outliers),
  `.s8` (fp16 per-row outlier scale); the permuted norm weights; the runtime reorder indices
  (`input_layernorm.reorder_index`, `post_attention_layernorm.reorder_index`,
  `self_attn.o_proj.reorder_index`, int32); embeddings, final norm and lm_head in fp16.
- `atom_quant_config.json`: the scheme (group size, outliers, clip ratios, GPTQ, KV bits), the calibration.
- `config.json` and the tokenizer files, copied.

Every input check (model config, sizes against group/outliers, calibration text length) runs before
the model is loaded, and the directory appears only when complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from pathlib import Path

import numpy as np

from atom_tvm.datasets import WIKIPEDIA, load_text
from atom_tvm.errors import UserError, run_command
from atom_tvm.package import write_json_atomic
from atom_tvm.staging import check_output_dir, staged_output_dir

QUANT_CONFIG = "atom_quant_config.json"
LAYOUT_VERSION = 1
# Our model's fused matrices (relax_models/llama.py) and the Hugging Face Linears stacked into each,
# in row order. All parts of one fused matrix read the same activation site.
FUSED_LINEARS = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}
RUNTIME_INDEX = {"attn_in": "input_layernorm.reorder_index",
                 "mlp_in": "post_attention_layernorm.reorder_index",
                 "o_in": "self_attn.o_proj.reorder_index"}


def check_sizes(cfg, group_size: int, n_outliers: int) -> None:
    """Every Linear input width must split into groups after the outliers are set aside."""
    from atom_tvm.quantization import formats

    widths = {"hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
              "attention output (heads x head_dim)": cfg.num_attention_heads * cfg.head_dim}
    for what, k in widths.items():
        try:
            formats.check_atom_split(k, group_size, n_outliers)
        except UserError as err:
            raise UserError(f"{what}: {err}") from None


def quantized_tensors(model, stats, qcfg, progress: bool = True) -> dict[str, np.ndarray]:
    """Reorder `model` in place and return the checkpoint's tensors by name."""
    import torch

    from atom_tvm.quantization.calibrate import ProgressLine
    from atom_tvm.quantization.reorder import apply_reorder, plan_reorder, runtime_indices
    from atom_tvm.quantization.simulate import quantize_atom_layout, reordered_hessian

    layers = model.model.layers
    plan = plan_reorder(stats, len(layers), qcfg.n_outliers)
    apply_reorder(model, plan)
    tensors: dict[str, np.ndarray] = {}

    def fp16(t: "torch.Tensor") -> np.ndarray:
        return t.detach().to(torch.float16).cpu().numpy()

    bar = ProgressLine("quantize", len(layers) * len(FUSED_LINEARS), "matrices") if progress else None
    for i, layer in enumerate(layers):
        prefix = f"model.layers.{i}."
        for fused, parts in FUSED_LINEARS.items():
            packed = [quantize_atom_layout(
                layer.get_submodule(p).weight.detach().cpu().numpy(), qcfg,
                reordered_hessian(stats, plan, prefix + p) if qcfg.gptq else None) for p in parts]
            for field in ("q4", "s4", "q8", "s8"):
                tensors[f"{prefix}{fused}.{field}"] = np.ascontiguousarray(
                    np.concatenate([getattr(w, field) for w in packed], axis=0))
            if bar:
                bar.update(i * len(FUSED_LINEARS) + list(FUSED_LINEARS).index(fused) + 1)
        tensors[prefix + "input_layernorm.weight"] = fp16(layer.input_layernorm.weight)
        tensors[prefix + "post_attention_layernorm.weight"] = fp16(layer.post_attention_layernorm.weight)
        for site, perm in runtime_indices(plan)[i].items():
            tensors[prefix + RUNTIME_INDEX[site]] = perm.astype(np.int32)
    if bar:
        bar.close()
    tensors["model.embed_tokens.weight"] = fp16(model.model.embed_tokens.weight)
    tensors["model.norm.weight"] = fp16(model.model.norm.weight)
    if not model.config.tie_word_embeddings:
        tensors["lm_head.weight"] = fp16(model.lm_head.weight)
    return tensors


def quantize(args: argparse.Namespace) -> Path:
    from atom_tvm.hf_weights import read_tokenizer_files
    from atom_tvm.quantization.calibrate import calibrate, calibration_windows
    from atom_tvm.quantization.simulate import preset
    from relax_models.llama import LlamaConfig

    # Input checks, cheapest first, before the model is loaded or anything is written.
    cfg = LlamaConfig.from_model_dir(args.model)
    qcfg = preset("atom-w4a4", group_size=args.group_size, n_outliers=args.n_outliers, gptq=not args.no_gptq)
    check_sizes(cfg, qcfg.group_size, qcfg.n_outliers)
    check_output_dir(args.output, args.force)
    tokenizer_files = read_tokenizer_files(args.model)
    text = load_text(args.calib_text, "train")
    calibration_windows(args.model, text, args.calib_windows, args.calib_window_length)

    from atom_tvm.quantization.calibrate import load_float_model

    model = load_float_model(args.model, args.device)
    stats = calibrate(args.model, args.calib_text, "train", args.calib_windows, args.calib_window_length,
                      hessian=qcfg.gptq, device=args.device, model=model)
    tensors = quantized_tensors(model, stats, qcfg)
    from safetensors.numpy import save_file

    with staged_output_dir(args.output) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "atom-tvm"})
        write_json_atomic(tmp / QUANT_CONFIG, {"layout_version": LAYOUT_VERSION, "scheme": "atom-w4a4",
                                                "config": dataclasses.asdict(qcfg), "calibration": stats.info})
        for f in [args.model / "config.json", *tokenizer_files]:
            shutil.copy2(f, tmp / f.name)
    print(f"done: {args.output} ({sum(t.nbytes for t in tensors.values()) / 2**20:.1f} MiB)")
    return args.output


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m atom_tvm.quantize", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, type=Path, help="Hugging Face Llama directory")
    p.add_argument("-o", "--output", required=True, type=Path, help="Atom checkpoint directory to write")
    p.add_argument("--group-size", type=int, default=128, help="64 or 128 (default 128)")
    p.add_argument("--n-outliers", type=int, default=128, help="outlier channels kept in INT8 (default 128)")
    p.add_argument("--no-gptq", action="store_true", help="round-to-nearest weights instead of GPTQ")
    p.add_argument("--calib-text", default=WIKIPEDIA, help="'wikipedia', a text file or a corpus directory")
    p.add_argument("--calib-windows", type=int, default=128)
    p.add_argument("--calib-window-length", type=int, default=2048)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where calibration runs")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: quantize(args))


if __name__ == "__main__":
    sys.exit(main())
