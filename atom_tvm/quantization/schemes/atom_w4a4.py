"""``atom-w4a4``: Atom's W4A4 Llama from an Atom checkpoint (`python -m atom_tvm.quantize`).

Per decoder layer the mutator swaps in (kernels: `tir_kernels.quantize`, `tir_kernels.w4a4_gemm`)::

    input_layernorm          RMSNorm + quantize (fused)  -> packed INT4 groups + INT8 outliers
    self_attn.qkv_proj       W4A4 GEMM on the packed activation
    self_attn.o_proj         quantize (outliers masked in place and copied, or gathered), then the W4A4
                             GEMM with the residual add in its epilogue
    post_attention_layernorm RMSNorm + quantize (fused)
    mlp.gate_up_proj         W4A4 GEMM
    mlp.act                  SiLU(gate) * up + quantize (fused; down_proj's reorder is folded offline)
    mlp.down_proj            W4A4 GEMM with the residual add in its epilogue

so no float activation of a decoder Linear input is ever written to memory. The norms read the
residual stream in order when the checkpoint stores it in the quantizer's channel order (residual
order "shared", the default of `python -m atom_tvm.quantize`), and through their per-layer reorder
index (`tir_kernels.quantize.rmsnorm_reorder_quantize`) for "per-layer" checkpoints. o_proj's
quantizer reads its row in order too (`tir_kernels.quantize.outlier_mask_quantize`) when the
checkpoint masks its outliers in place ("masked", the default; o_proj is then K + O wide), and
gathers it through its reorder index (`reorder_quantize`) for "gathered" ones. Everything else stays
float16 as in the checkpoint (embeddings, final norm, lm_head, attention), and the KV cache is
Atom's with the checkpoint's KV format (INT4 by default; ``--kv-cache`` overrides it).

Every projection calls `tir_kernels.w4a4_gemm.w4a4_linear`: one PrimFunc that holds the decode gemv
and the tiled kernels and branches on M inside, when it runs (Relax itself could branch only outside
a dataflow block, with ``relax.If``, which the nn frontend does not emit). So ``batch_decode``, whose
M is the batch, gets the gemv for a few sequences and ``prefill`` the tiled kernel.

The checkpoint's parameter names are the mutated model's: ``<linear>.q4/.s4/.q8/.s8``,
``<norm>.weight`` (permuted), ``self_attn.o_proj.outlier_index`` and ``.outlier_mask`` (masked) or
``self_attn.o_proj.reorder_index`` (gathered) and, per-layer order only, ``<norm>.reorder_index``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterator

import numpy as np
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.target import Target

from atom_tvm.errors import UserError
from atom_tvm.hf_weights import CheckpointReader, ParamSpec, iter_params
from atom_tvm.quantization.reorder import O_PROJ_OUTLIERS, RESIDUAL_ORDERS
from atom_tvm.quantize import LAYOUT_VERSION, QUANT_CONFIG
from atom_tvm.quantization.schemes import QuantizationScheme, SchemeOptions, column_shard, register
from relax_models.kernel_calls import cached_kernel, kernel_variant, out_tensor, rows
from relax_models.llama import LlamaConfig, LlamaDecoderLayer, all_reduce
from tir_kernels import quantize as quantize_kernels
from tir_kernels.w4a4_gemm import W4A4Shape, w4a4_linear

#: Checkpoint layouts this build reads (`atom_tvm.quantize.LAYOUT_VERSION` and every one before it).
READABLE_LAYOUTS = tuple(range(1, LAYOUT_VERSION + 1))
#: KV cache format of each of the checkpoint's ``kv_bits``.
KV_FORMAT = {4: "int4", 8: "int8", 16: "fp16"}


@dataclasses.dataclass(frozen=True)
class AtomLayout:
    """What every quantized module of the model is built for: INT4 group size ``G``, ``O`` INT8
    outlier channels (the last O after the reorder), activation clip ratio."""

    group_size: int
    n_outliers: int
    clip: float

    def packed_shapes(self, rows_, k: int) -> list[tuple[tuple, str]]:
        """(shape, dtype) of q4, s4, q8, s8 for ``rows_`` rows of ``k`` channels."""
        return quantize_kernels.output_shapes(rows_, k, self.group_size, self.n_outliers)


@dataclasses.dataclass
class PackedActivation:
    """Tokens quantized on the fly into Atom's layout: the quantizer kernel's four outputs, ``[M, ...]``,
    and the leading shape (batch, sequence) of the tensor they came from."""

    q4: Tensor
    s4: Tensor
    q8: Tensor
    s8: Tensor
    lead: tuple

    @property
    def tensors(self) -> list[Tensor]:
        return [self.q4, self.s4, self.q8, self.s8]


_rmsnorm_quantize = cached_kernel(quantize_kernels.rmsnorm_quantize)
_rmsnorm_reorder_quantize = cached_kernel(quantize_kernels.rmsnorm_reorder_quantize)
_silu_mul_quantize = cached_kernel(quantize_kernels.silu_mul_quantize)
_reorder_quantize = cached_kernel(quantize_kernels.reorder_quantize)
_outlier_mask_quantize = cached_kernel(quantize_kernels.outlier_mask_quantize)


_w4a4_linear = cached_kernel(w4a4_linear)


def _quantized(kernel, name: str, inputs: list, m, k: int, lead: tuple, layout: AtomLayout) -> PackedActivation:
    outs = [out_tensor(shape, dtype) for shape, dtype in layout.packed_shapes(m, k)]
    return PackedActivation(*op.tensor_ir_op(kernel, name, inputs, out=outs), lead)


class RMSNormQuantize(nn.Module):
    """RMSNorm (weight permuted offline) + per-token quantize: ``x [..., H]`` fp16 ->
    `PackedActivation` of the quantizer's channel order. ``reorder``: ``x`` is in the model's own
    order and read through this layer's ``reorder_index`` (residual order "per-layer"); otherwise
    it is stored in the quantizer's order already ("shared")."""

    def __init__(self, hidden: int, eps: float, layout: AtomLayout, target: Target, reorder: bool):
        self.hidden, self.eps, self.layout, self.target = hidden, eps, layout, target
        self.weight = nn.Parameter((hidden,), "float16")
        self.reorder_index = nn.Parameter((hidden,), "int32") if reorder else None

    def forward(self, x: Tensor) -> PackedActivation:
        flat, lead = rows(x)
        lay = self.layout
        args = (self.hidden, lay.group_size, lay.n_outliers, lay.clip, self.eps, kernel_variant(self.target))
        if self.reorder_index is None:
            return _quantized(_rmsnorm_quantize(*args), "rmsnorm_quantize", [flat, self.weight],
                              flat.shape[0], self.hidden, lead, lay)
        return _quantized(_rmsnorm_reorder_quantize(*args), "rmsnorm_reorder_quantize",
                          [flat, self.weight, self.reorder_index], flat.shape[0], self.hidden, lead, lay)


class SiLUMulQuantize(nn.Module):
    """``SiLU(gate) * up`` + per-token quantize: ``gate_up [..., 2I]`` fp16 -> `PackedActivation`
    (down_proj's input order is folded into the gate/up rows, so there is no reorder)."""

    def __init__(self, intermediate: int, layout: AtomLayout, target: Target):
        self.intermediate, self.layout, self.target = intermediate, layout, target

    def forward(self, gate_up: Tensor) -> PackedActivation:
        flat, lead = rows(gate_up)
        lay = self.layout
        kernel = _silu_mul_quantize(self.intermediate, lay.group_size, lay.n_outliers, lay.clip,
                                    kernel_variant(self.target))
        return _quantized(kernel, "silu_mul_quantize", [flat], flat.shape[0], self.intermediate, lead, lay)


class W4A4Linear(nn.Module):
    """``y = x W^T (+ residual)`` with W in Atom's packed layout and x a `PackedActivation`."""

    def __init__(self, in_features: int, out_features: int, layout: AtomLayout, target: Target):
        self.in_features, self.out_features, self.layout, self.target = in_features, out_features, layout, target
        (q4, _), (s4, _), (q8, _), (s8, _) = layout.packed_shapes(out_features, in_features)
        self.q4 = nn.Parameter(q4, "uint8")
        self.s4 = nn.Parameter(s4, "float16")
        self.q8 = nn.Parameter(q8, "int8")
        self.s8 = nn.Parameter(s8, "float16")

    def forward(self, x: PackedActivation, residual: Tensor | None = None) -> Tensor:
        m = x.q4.shape[0]
        n = self.out_features
        kernel = _w4a4_linear(self.target, n, self.in_features, self.layout.group_size, self.layout.n_outliers,
                              residual is not None)
        args = [*x.tensors, self.q4, self.s4, self.q8, self.s8]
        if residual is not None:
            args.append(op.reshape(residual, (m, n)))
        y = op.tensor_ir_op(kernel, "w4a4_linear", args, out=out_tensor((m, n), "float16"))
        return op.reshape(y, (*x.lead, n))


class ReorderQuantizeW4A4Linear(W4A4Linear):
    """o_proj of a "gathered" checkpoint: its input (head-major attention output) is reordered and
    quantized at run time."""

    def __init__(self, in_features: int, out_features: int, layout: AtomLayout, target: Target):
        super().__init__(in_features, out_features, layout, target)
        self.reorder_index = nn.Parameter((in_features,), "int32")

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:  # type: ignore[override]
        flat, lead = rows(x)
        lay = self.layout
        kernel = _reorder_quantize(self.in_features, lay.group_size, lay.n_outliers, lay.clip,
                                   kernel_variant(self.target))
        packed = _quantized(kernel, "reorder_quantize", [flat, self.reorder_index], flat.shape[0],
                            self.in_features, lead, lay)
        return super().forward(packed, residual)


class MaskedOutliersW4A4Linear(W4A4Linear):
    """o_proj of a "masked" checkpoint: its ``width`` inputs (attention's output, in order) quantized
    at run time as the ``width + O`` channels ``[x * keep, x[:, outlier_index]]`` that its packed
    weight multiplies (`formats.masked_outliers`)."""

    def __init__(self, width: int, out_features: int, layout: AtomLayout, target: Target):
        super().__init__(width + layout.n_outliers, out_features, layout, target)
        self.width = width
        self.outlier_index = nn.Parameter((layout.n_outliers,), "int32")
        self.outlier_mask = nn.Parameter((width // 8,), "uint8")

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:  # type: ignore[override]
        flat, lead = rows(x)
        lay = self.layout
        kernel = _outlier_mask_quantize(self.width, lay.group_size, lay.n_outliers, lay.clip,
                                        kernel_variant(self.target))
        packed = _quantized(kernel, "outlier_mask_quantize", [flat, self.outlier_index, self.outlier_mask],
                            flat.shape[0], self.in_features, lead, lay)
        return super().forward(packed, residual)


class BlockedSiLUMulQuantize(nn.Module):
    """`SiLUMulQuantize` of each block of a checkpoint laid out for tensor parallelism: gate_up's
    output is ``blocks`` chunks ``[gate_b, up_b]``, each quantized with its own outlier block."""

    def __init__(self, intermediate: int, blocks: int, layout: AtomLayout, target: Target):
        self.blocks = blocks
        self.block_act = SiLUMulQuantize(intermediate // blocks, layout, target)

    def forward(self, gate_up: Tensor) -> list[PackedActivation]:
        chunks = op.split(gate_up, self.blocks, axis=-1) if self.blocks > 1 else [gate_up]
        return [self.block_act(chunk) for chunk in chunks]


class BlockedW4A4Linear(nn.Module):
    """o_proj or down_proj of a checkpoint laid out for tensor parallelism (``quantize
    --tensor-parallel-shards``): the input is ``blocks`` contiguous slices, each quantized on its own
    (o_proj: here, by ``quantizing_block``'s quantizer; down_proj: `BlockedSiLUMulQuantize`'s
    outputs, ``quantizing_block`` None) and multiplied by its own packed weights.

    Each block's float16 partial product is summed in float32, over the blocks and (all-reduce) over
    the shards, and the residual is added before the one rounding to float16. Sums of a few float16
    terms are exact in float32 (their mantissas fit), so the result does not depend on the order in
    which they are added: one GPU running all blocks and N GPUs running N/S each (NCCL reducing in its
    own order) give the same bits. A W4A4 model turns any float16 rounding difference into whole INT4
    steps in the next quantizer, so this is what keeps their greedy tokens equal."""

    def __init__(self, in_features: int, out_features: int, blocks: int, shards: int,
                 quantizing_block: type[W4A4Linear] | None, layout: AtomLayout, target: Target):
        block = quantizing_block or W4A4Linear
        self.blocks = nn.ModuleList([block(in_features // blocks, out_features, layout, target)
                                     for _ in range(blocks)])
        self.splits_input, self.shards = quantizing_block is not None, shards

    def forward(self, x: Tensor | list[PackedActivation], residual: Tensor) -> Tensor:
        if self.splits_input:
            x = op.split(x, len(self.blocks), axis=-1) if len(self.blocks) > 1 else [x]
        total = None
        for block, block_x in zip(self.blocks, x):
            partial = block(block_x).astype("float32")
            total = partial if total is None else total + partial
        return (all_reduce(total, self.shards) + residual.astype("float32")).astype("float16")


class AtomW4A4Mutator(nn.Mutator):
    """Swaps each decoder layer's norms, SiLU-mul and Linears for the modules above; the final norm
    and lm_head (not in a decoder layer) stay float16. ``checkpoint_shards`` > 1: the checkpoint is
    laid out for that many shards, so each of this model's ``shards`` runs the row-parallel
    Linears as ``checkpoint_shards // shards`` blocks."""

    def __init__(self, cfg: LlamaConfig, layout: AtomLayout, target: Target, residual_order: str,
                 o_proj_outliers: str, shards: int = 1, checkpoint_shards: int = 1):
        self.cfg, self.layout, self.target = cfg, layout, target
        self.norm_reorder = residual_order == "per-layer"
        self.o_proj_block = MaskedOutliersW4A4Linear if o_proj_outliers == "masked" else ReorderQuantizeW4A4Linear
        self.shards, self.checkpoint_shards = shards, checkpoint_shards

    def visit_module(self, name: str, node: nn.Module):
        if not isinstance(node, LlamaDecoderLayer):
            return super().visit_module(name, node)
        cfg, lay, tgt = self.cfg, self.layout, self.target
        h = cfg.hidden_size
        attn, mlp = node.self_attn, node.mlp
        i = mlp.intermediate_size  # this shard's
        node.input_layernorm = RMSNormQuantize(h, cfg.rms_norm_eps, lay, tgt, self.norm_reorder)
        attn.qkv_proj = W4A4Linear(h, attn.qkv_proj.out_features, lay, tgt)
        node.post_attention_layernorm = RMSNormQuantize(h, cfg.rms_norm_eps, lay, tgt, self.norm_reorder)
        mlp.gate_up_proj = W4A4Linear(h, 2 * i, lay, tgt)
        if self.checkpoint_shards == 1:
            attn.o_proj = self.o_proj_block(attn.o_proj.in_features, h, lay, tgt)
            mlp.act = SiLUMulQuantize(i, lay, tgt)
            mlp.down_proj = W4A4Linear(i, h, lay, tgt)
        else:
            blocks = self.checkpoint_shards // self.shards
            attn.o_proj = BlockedW4A4Linear(attn.o_proj.in_features, h, blocks, self.shards, self.o_proj_block,
                                            lay, tgt)
            mlp.act = BlockedSiLUMulQuantize(i, blocks, lay, tgt)
            mlp.down_proj = BlockedW4A4Linear(i, h, blocks, self.shards, None, lay, tgt)
        return node


class AtomW4A4(QuantizationScheme):
    name = "atom-w4a4"
    dtype = "float16"

    def __init__(self, layout: AtomLayout, kv_bits: int, quant_config: dict, checkpoint_shards: int = 1):
        self.layout = layout
        self.kv_cache = KV_FORMAT[kv_bits]
        self.quant_config = quant_config
        self.checkpoint_shards = checkpoint_shards

    def mutate(self, model: nn.Module, cfg: LlamaConfig, target: Target) -> nn.Module:
        q = self.quant_config
        return AtomW4A4Mutator(cfg, self.layout, target, q["residual_order"], q["o_proj_outliers"],
                               model.tensor_parallel_shards, self.checkpoint_shards).visit("", model)

    def check_tensor_parallel(self, shards: int) -> None:
        """A shard quantizes its slice of o_proj's and down_proj's input on its own, so the checkpoint
        must have been laid out for it: for N shards, or a multiple of N."""
        if self.checkpoint_shards % shards:
            raise UserError(f"--tensor-parallel-shards {shards}: this Atom checkpoint is laid out for "
                            f"{self.checkpoint_shards} shard(s) (each shard needs its own outlier block in o_proj "
                            f"and down_proj); re-run python -m atom_tvm.quantize --tensor-parallel-shards {shards}")

    def shard_param(self, name: str, array: np.ndarray, cfg: LlamaConfig, shard: int, shards: int
                    ) -> tuple[str, np.ndarray] | None:
        """Row-parallel blocks go whole to the shard that holds them (renumbered from 0 there);
        gate_up's rows are already ordered block by block, so a shard's are one range; the rest
        as for float weights."""
        per_shard = self.checkpoint_shards // shards
        linear, sep, rest = name.partition(".blocks.")
        if sep:
            block, _, field = rest.partition(".")
            if int(block) // per_shard != shard:
                return None
            return f"{linear}.blocks.{int(block) % per_shard}.{field}", array
        if name.rpartition(".")[0].endswith("gate_up_proj") and self.checkpoint_shards > 1:
            return name, column_shard(array, [len(array)], shard, shards)
        return super().shard_param(name, array, cfg, shard, shards)

    def params(self, model_dir: Path, expected: list[ParamSpec]) -> Iterator[tuple[str, np.ndarray]]:
        """The checkpoint's tensors under their own names, except, in the per-layer residual order,
        the decoder norms' weights.

        The checkpoint stores each of those permuted, ``w[P]`` (so that ``norm(x[P]) * w[P]``). In the
        shared order the residual stream is stored permuted too and the kernel reads both in order.
        In the per-layer order the fused kernel gathers the input channel ``P[j]`` and scales it by the
        weight of that same source channel, ``weight[P[j]]``: it reads the weight in the residual
        stream's order, which is the checkpoint's ``w[P]`` scattered back through ``P``.
        """
        reader = CheckpointReader(model_dir)
        per_layer = self.quant_config["residual_order"] == "per-layer"
        for name, array in iter_params(model_dir, expected):
            if per_layer and name.startswith("model.layers.") and name.endswith("layernorm.weight"):
                index = reader.get(name.removesuffix("weight") + "reorder_index")
                unpermuted = np.empty_like(array)
                unpermuted[index] = array
                array = unpermuted
            yield name, array

    def to_json(self) -> dict:
        q = self.quant_config
        return {**super().to_json(), "group_size": self.layout.group_size, "n_outliers": self.layout.n_outliers,
                "activation_clip": self.layout.clip, "weight_clip": q["clip_w"], "gptq": q["gptq"],
                "kv_bits": q["kv_bits"], "residual_order": q["residual_order"],
                "o_proj_outliers": q["o_proj_outliers"], "checkpoint_shards": self.checkpoint_shards}


def read_quant_config(model_dir: Path) -> dict:
    """The checkpoint's scheme (`atom_tvm.quantize`'s QuantConfig as a dict, plus the
    ``tensor_parallel_shards`` it is laid out for), checked."""
    path = model_dir / QUANT_CONFIG
    if not path.is_file():
        raise UserError(f"{model_dir}: no {QUANT_CONFIG}; --quantization atom-w4a4 builds from an Atom "
                        f"checkpoint: pass --model DIR from python -m atom_tvm.quantize --model HF_DIR -o DIR")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if doc.get("layout_version") not in READABLE_LAYOUTS or doc.get("scheme") != "atom-w4a4":
        raise UserError(f"{path}: layout {doc.get('layout_version')!r} of scheme {doc.get('scheme')!r}; this "
                        f"build reads layouts {', '.join(map(str, READABLE_LAYOUTS))} of atom-w4a4 (re-run "
                        f"python -m atom_tvm.quantize)")
    # layout 1 had per-layer orders only, layouts 1 and 2 gathered o_proj outliers only
    q = {"residual_order": "per-layer", "o_proj_outliers": "gathered", **doc.get("config", {})}
    expected = {"w_bits": 4, "a_bits": 4, "outlier_bits": 8}
    if any(q.get(k) != v for k, v in expected.items()) or q.get("kv_bits") not in KV_FORMAT:
        raise UserError(f"{path}: config {q} is not W4A4 with INT8 outliers; re-run python -m atom_tvm.quantize")
    if q["residual_order"] not in RESIDUAL_ORDERS:
        raise UserError(f"{path}: residual order {q['residual_order']!r} is not one of "
                        f"{', '.join(RESIDUAL_ORDERS)}; re-run python -m atom_tvm.quantize")
    if q["o_proj_outliers"] not in O_PROJ_OUTLIERS:
        raise UserError(f"{path}: o_proj outlier layout {q['o_proj_outliers']!r} is not one of "
                        f"{', '.join(O_PROJ_OUTLIERS)}; re-run python -m atom_tvm.quantize")
    return {**q, "tensor_parallel_shards": int(doc.get("tensor_parallel_shards", 1))}


def check_shapes(cfg: LlamaConfig, layout: AtomLayout, o_proj_outliers: str, shards: int = 1,
                 checkpoint_shards: int = 1) -> None:
    """Every GEMM and quantizer of one shard of the model accepts its shape (named errors before
    compiling); row-parallel inputs come in ``checkpoint_shards`` blocks; a masked o_proj multiplies
    O more channels."""
    g, o = layout.group_size, layout.n_outliers
    attn_width = cfg.num_attention_heads * cfg.head_dim
    o_proj_k = attn_width // checkpoint_shards + (o if o_proj_outliers == "masked" else 0)
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    for what, n, k in (("qkv_proj", qkv // shards, cfg.hidden_size),
                       ("o_proj", cfg.hidden_size, o_proj_k),
                       ("gate_up_proj", 2 * cfg.intermediate_size // shards, cfg.hidden_size),
                       ("down_proj", cfg.hidden_size, cfg.intermediate_size // checkpoint_shards)):
        try:
            W4A4Shape(n, k, g, o).check()
            if k % quantize_kernels.VEC:
                raise UserError(f"K = {k} is not a multiple of {quantize_kernels.VEC}")
        except UserError as err:
            raise UserError(f"atom-w4a4 {what} ({n}x{k}, group {g}, {o} outliers): {err}") from None


@register("atom-w4a4")
def atom_w4a4(model_dir: Path, cfg: LlamaConfig, options: SchemeOptions) -> AtomW4A4:
    q = read_quant_config(model_dir)
    layout = AtomLayout(int(q["group_size"]), int(q["n_outliers"]), float(q["clip_a"]))
    if options.group_size not in (None, layout.group_size):
        raise UserError(f"--group-size {options.group_size}: the Atom checkpoint {model_dir} is quantized with "
                        f"group size {layout.group_size} (omit --group-size, or re-quantize)")
    scheme = AtomW4A4(layout, int(q["kv_bits"]), q, q["tensor_parallel_shards"])
    scheme.check_tensor_parallel(options.tensor_parallel_shards)
    check_shapes(cfg, layout, q["o_proj_outliers"], options.tensor_parallel_shards, q["tensor_parallel_shards"])
    return scheme
