"""`python -m atom_tvm.quantize`: Atom's offline recipe, writing the tensors the W4A4 kernels read.

    python -m atom_tvm.quantize --model models/SmolLM2-135M-Instruct --group-size 64 \
        --calib-windows 128 --calib-window-length 2048 -o models/SmolLM2-135M-Instruct-atom

Calibrate on text (outlier statistics, and Hessians for GPTQ) -> reorder each activation site's
largest channels to the end -> quantize every decoder Linear (INT4 groups + INT8 outliers, clipped,
GPTQ by default) -> write an *Atom checkpoint* directory (layout in docs/design.md):

- `model.safetensors`: per layer the fused `self_attn.qkv_proj`, `self_attn.o_proj`, `mlp.gate_up_proj`,
  `mlp.down_proj` as `.q4` (uint8, two INT4 per byte), `.s4` (fp16 group scales), `.q8` (int8 outliers),
  `.s8` (fp16 per-row outlier scale); the permuted norm weights; o_proj's outlier channels (with the
  default ``--o-proj-outliers masked``: `self_attn.o_proj.outlier_index`, int32 [O], and
  `self_attn.o_proj.outlier_mask`, uint8 [K/8], with o_proj's packed weight K + O wide; with
  ``gathered``: the reorder index `self_attn.o_proj.reorder_index`); with ``--residual-order
  per-layer`` the norms' reorder indices `input_layernorm.reorder_index` and
  `post_attention_layernorm.reorder_index` (int32); embeddings, final
  norm and lm_head in fp16 (with the default ``--residual-order shared``, in the residual stream's
  stored channel order: see `atom_tvm.quantization.reorder`).
- `atom_quant_config.json`: the scheme (group size, outliers, clip ratios, GPTQ, KV bits, residual
  order, o_proj outlier layout), the calibration, and ``tensor_parallel_shards`` (``--tensor-parallel-shards N``: o_proj and down_proj are then
  quantized per shard slice, under ``<linear>.blocks.<b>.*``; see `quantized_tensors`).
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
from atom_tvm.quantization.reorder import O_PROJ_OUTLIERS, RESIDUAL_ORDERS
from atom_tvm.staging import check_output_dir, staged_output_dir

QUANT_CONFIG = "atom_quant_config.json"
# 2: the residual order (config "residual_order"; layout 1 checkpoints are all "per-layer").
# 3: o_proj's outlier layout (config "o_proj_outliers"; layouts 1 and 2 are all "gathered").
LAYOUT_VERSION = 3
# Our model's fused matrices (relax_models/llama.py) and the Hugging Face Linears stacked into each,
# in row order. All parts of one fused matrix read the same activation site.
FUSED_LINEARS = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}
# The row-parallel matrices under tensor parallelism (each shard holds a slice of their input).
ROW_PARALLEL_LINEARS = ("self_attn.o_proj", "mlp.down_proj")
RUNTIME_INDEX = {"attn_in": "input_layernorm.reorder_index",
                 "mlp_in": "post_attention_layernorm.reorder_index",
                 "o_in": "self_attn.o_proj.reorder_index"}


def check_sizes(cfg, group_size: int, n_outliers: int, shards: int = 1, o_proj_outliers: str = "gathered") -> None:
    """Every Linear input width must split into groups after the outliers are set aside (for
    ``shards`` > 1: each shard's slice of the row-parallel inputs; o_proj's input with ``masked``
    outliers keeps all its channels in the groups)."""
    from atom_tvm.quantization import formats

    cfg.check_tensor_parallel(shards)
    slice_of = f" / {shards} shards" if shards > 1 else ""
    attention = cfg.num_attention_heads * cfg.head_dim // shards
    widths = {"hidden_size": cfg.hidden_size, f"intermediate_size{slice_of}": cfg.intermediate_size // shards,
              f"attention output (heads x head_dim){slice_of}":
                  attention + n_outliers if o_proj_outliers == "masked" else attention}
    for what, k in widths.items():
        try:
            formats.check_atom_split(k, group_size, n_outliers)
        except UserError as err:
            raise UserError(f"{what}: {err}") from None


def quantized_tensors(model, stats, qcfg, shards: int = 1, progress: bool = True) -> dict[str, np.ndarray]:
    """Reorder `model` in place and return the checkpoint's tensors by name.

    ``shards`` > 1 lays the checkpoint out for that many tensor-parallel shards (or any divisor of it):
    o_proj and down_proj, whose input a shard sees only a slice of, are quantized per slice (block
    ``b`` of ``shards``, its own reorder, groups and 128 outliers) under ``<linear>.blocks.<b>.*``,
    and gate_up's rows are ordered block by block (gate then up of block 0, then of block 1, ...), so a
    shard's rows are one contiguous range.
    """
    import torch

    from atom_tvm.quantization.calibrate import ProgressLine
    from atom_tvm.quantization.formats import outlier_mask
    from atom_tvm.quantization.reorder import reorder_model
    from atom_tvm.quantization.simulate import quantize_atom_layout, reordered_hessian

    layers = model.model.layers
    reordered = reorder_model(model, stats, qcfg.n_outliers, qcfg.residual_order, shards, qcfg.o_proj_outliers)
    plan, stats = reordered.plan, reordered.stats
    tensors: dict[str, np.ndarray] = {}

    def fp16(t: "torch.Tensor") -> np.ndarray:
        return t.detach().to(torch.float16).cpu().numpy()

    def pack(name: str, fields, cols: slice = slice(None)) -> None:
        """Quantize the columns ``cols`` of each (reordered) Linear in ``fields``' values and store
        them stacked by rows under ``name.<field>``."""
        packed = []
        for part in fields:
            w = layer.get_submodule(part).weight.detach().cpu().numpy()[:, cols]
            hessian = reordered_hessian(stats, plan, prefix + part)[cols, cols] if qcfg.gptq else None
            packed.append(quantize_atom_layout(w, qcfg, hessian))
        for field in ("q4", "s4", "q8", "s8"):
            tensors[f"{name}.{field}"] = np.ascontiguousarray(np.concatenate([getattr(w, field) for w in packed]))

    bar = ProgressLine("quantize", len(layers) * len(FUSED_LINEARS), "matrices") if progress else None
    for i, layer in enumerate(layers):
        prefix = f"model.layers.{i}."
        for fused, parts in FUSED_LINEARS.items():
            if shards > 1 and fused in ROW_PARALLEL_LINEARS:
                width = layer.get_submodule(parts[0]).in_features // shards
                for b in range(shards):
                    pack(f"{prefix}{fused}.blocks.{b}", parts, slice(b * width, (b + 1) * width))
            else:
                pack(prefix + fused, parts)
            if bar:
                bar.update(i * len(FUSED_LINEARS) + list(FUSED_LINEARS).index(fused) + 1)
        if shards > 1:
            name = prefix + "mlp.gate_up_proj"
            for field in ("q4", "s4", "q8", "s8"):
                gate, up = np.split(tensors[f"{name}.{field}"], 2)
                tensors[f"{name}.{field}"] = np.ascontiguousarray(np.concatenate(
                    [half for pair in zip(np.split(gate, shards), np.split(up, shards)) for half in pair]))
        tensors[prefix + "input_layernorm.weight"] = fp16(layer.input_layernorm.weight)
        tensors[prefix + "post_attention_layernorm.weight"] = fp16(layer.post_attention_layernorm.weight)
        if i in reordered.masked:
            o_proj = prefix + "self_attn.o_proj"
            masked = reordered.masked[i]
            for b, outl in enumerate(masked.outliers):
                name = f"{o_proj}.blocks.{b}" if shards > 1 else o_proj
                tensors[f"{name}.outlier_index"] = outl.astype(np.int32)
                tensors[f"{name}.outlier_mask"] = outlier_mask(outl, masked.width)
        for site, perm in reordered.indices[i].items():
            if shards > 1 and site == "o_in":  # each block's index counts within its slice
                for b, block in enumerate(np.split(perm, shards)):
                    tensors[f"{prefix}self_attn.o_proj.blocks.{b}.reorder_index"] = (
                        block - b * len(block)).astype(np.int32)
            else:
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
    qcfg = preset("atom-w4a4", group_size=args.group_size, n_outliers=args.n_outliers, gptq=not args.no_gptq,
                  residual_order=args.residual_order, o_proj_outliers=args.o_proj_outliers)
    check_sizes(cfg, qcfg.group_size, qcfg.n_outliers, args.tensor_parallel_shards, qcfg.o_proj_outliers)
    check_output_dir(args.output, args.force)
    tokenizer_files = read_tokenizer_files(args.model)
    text = load_text(args.calib_text, "train")
    calibration_windows(args.model, text, args.calib_windows, args.calib_window_length)

    from atom_tvm.quantization.calibrate import load_float_model

    model = load_float_model(args.model, args.device)
    stats = calibrate(args.model, args.calib_text, "train", args.calib_windows, args.calib_window_length,
                      hessian=qcfg.gptq, device=args.device, model=model)
    tensors = quantized_tensors(model, stats, qcfg, args.tensor_parallel_shards)
    from safetensors.numpy import save_file

    with staged_output_dir(args.output) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "atom-tvm"})
        write_json_atomic(tmp / QUANT_CONFIG, {"layout_version": LAYOUT_VERSION, "scheme": "atom-w4a4",
                                                "config": dataclasses.asdict(qcfg), "calibration": stats.info,
                                                "tensor_parallel_shards": args.tensor_parallel_shards})
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
    p.add_argument("--residual-order", default="shared", choices=RESIDUAL_ORDERS,
                   help="the norm inputs' outlier order: one for all layers, with the residual stream stored in "
                        "it (default; in-order norm kernels), or Atom's own per layer (a gather in every norm)")
    p.add_argument("--o-proj-outliers", default="masked", choices=O_PROJ_OUTLIERS,
                   help="o_proj's outlier channels: zeroed in place in the INT4 groups and copied to the INT8 "
                        "block (default; an in-order quantizer, O more GEMM inputs), or moved out of the groups "
                        "as in Atom's paper (a gather in o_proj's quantizer)")
    p.add_argument("--calib-text", default=WIKIPEDIA, help="'wikipedia', a text file or a corpus directory")
    p.add_argument("--calib-windows", type=int, default=128)
    p.add_argument("--calib-window-length", type=int, default=2048)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where calibration runs")
    p.add_argument("--tensor-parallel-shards", type=int, default=1,
                   help="lay the checkpoint out for N tensor-parallel shards (builds with N or a divisor of N "
                        "shards): o_proj and down_proj get one outlier block and set of groups per shard")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: quantize(args))


if __name__ == "__main__":
    sys.exit(main())
