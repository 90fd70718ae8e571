"""Atom's outlier reorder: move each Linear input's K largest channels to the end.

Per decoder layer there are four activation *sites*, each the input of one or more Linears:

==========  =========================  ===============================  ===========================
site        activation                 weights it permutes              where the permutation lives
==========  =========================  ===============================  ===========================
attn_in     input_layernorm output     q/k/v columns, norm weight       shared: the residual stream's
                                                                        stored order; per-layer:
                                                                        runtime index (norm kernel)
mlp_in      post_attention_layernorm   gate/up columns, norm weight     as attn_in
o_in        attention output           o_proj columns                   runtime index (o_proj input)
down_in     SiLU(gate) * up            gate/up rows, down_proj columns  folded, no runtime cost
==========  =========================  ===============================  ===========================

Each site's permutation keeps the ordinary channels in their original order and appends the
``n_outliers`` channels with the largest calibration sum of squares (ascending channel index), so
a quantizer can treat the last ``n_outliers`` channels as the high-precision block.

The norm sites read the residual stream, which every layer shares. Two *residual orders*:

* ``per-layer`` (Atom's paper): each norm site gets its own permutation, so the stream stays in
  the original order and the fused norm kernel reads it through the runtime index ``P``, with the
  norm weight permuted offline (RMSNorm's statistic is a sum over all channels, so
  ``norm(x)[P] * w[P] == norm(x[P]) * w[P]``).
* ``shared`` (atom-tvm's default): one permutation ``P`` for both norm sites of every layer,
  chosen on their calibration sums of squares together (each site's normalized to sum 1, so no
  layer dominates), and the residual stream itself is stored in that order: the embedding's
  columns, o_proj's and down_proj's output rows, the final norm's weight and lm_head's columns are
  permuted by ``P`` offline. No norm needs an index; the kernel reads its rows in order. Its
  perplexity on SmolLM2 equals the per-layer order's (docs/accuracy.md), and the in-order RMSNorm
  quantizer is 1.3-1.9x faster (docs/bench/quantize_kernels.md).

The attention output is head-major and its channel order is fixed by attention itself. Two
*o_proj outlier* layouts:

* ``gathered`` (Atom's paper): o_proj's input is permuted at run time like the others, its
  outliers moved last (the quantizer gathers the row through the runtime index).
* ``masked`` (atom-tvm's default): o_proj's input stays in attention's order; its outlier
  channels are zeroed in place and *copied* after it, so o_proj becomes a Linear of K + O inputs
  fed ``[x * keep, x[:, outliers]]`` with weight ``[W * keep, W[:, outliers]]`` (the same product;
  `formats.masked_outliers`). The INT4 groups are groups of the original channels, the INT8 block
  holds the same outliers, and the quantizer reads its row in order
  (`tir_kernels.quantize.outlier_mask_quantize`) at the cost of O more GEMM input channels (3% of
  a 7B model's o_proj). On SmolLM2 its perplexity equals the gathered layout's
  (docs/accuracy.md). `expand_o_proj` rewrites the model so, with the calibration statistics of
  the expanded input derived from the original ones; the reorder then leaves o_proj in place.

The intermediate channels of the MLP, in contrast, are produced by gate/up rows and consumed
elementwise, so permuting those rows and down_proj's columns folds the order into the weights
entirely.

On a Hugging Face model, :func:`attach_runtime_indices` emulates the runtime indices with forward
pre-hooks (gathering the norm inputs and o_proj's input) so the reordered model computes exactly
what the original does.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from atom_tvm.errors import UserError
from atom_tvm.quantization.calibrate import CalibrationStats

# Site -> the Linear (under model.layers.N) whose input statistics choose the permutation.
SITE_LINEARS = {
    "attn_in": "self_attn.q_proj",
    "o_in": "self_attn.o_proj",
    "mlp_in": "mlp.gate_proj",
    "down_in": "mlp.down_proj",
}
RESIDUAL_ORDERS = ("shared", "per-layer")
O_PROJ_OUTLIERS = ("masked", "gathered")
# Sites whose permutation the runtime applies, by residual order.
RUNTIME_SITES = {"per-layer": ("attn_in", "mlp_in", "o_in"), "shared": ("o_in",)}
NORM_SITES = ("attn_in", "mlp_in")
# Linears that read each site's activation (their input columns are permuted).
SITE_CONSUMERS = {
    "attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o_in": ("self_attn.o_proj",),
    "mlp_in": ("mlp.gate_proj", "mlp.up_proj"),
    "down_in": ("mlp.down_proj",),
}
# RMSNorm whose output is each norm site (reads its input through the runtime index).
SITE_NORMS = {"attn_in": "input_layernorm", "mlp_in": "post_attention_layernorm"}

Plan = dict[int, dict[str, np.ndarray]]


def outlier_permutation(sumsq: np.ndarray, n_outliers: int) -> np.ndarray:
    """Channel order with the ``n_outliers`` largest-``sumsq`` channels last (int64 [K]).

    Ties are broken towards the lower channel index, so the choice is deterministic.
    """
    sumsq = np.asarray(sumsq)
    k = sumsq.shape[-1]
    if not 0 <= n_outliers <= k:
        raise UserError(f"{n_outliers} outlier channels do not fit {k} channels; use --n-outliers "
                        f"between 0 and {k}")
    ranked = np.argsort(-sumsq, kind="stable")
    outliers = np.zeros(k, dtype=bool)
    outliers[ranked[:n_outliers]] = True
    channels = np.arange(k)
    return np.concatenate([channels[~outliers], channels[outliers]])


# Sites read by a row-parallel Linear under tensor parallelism: each shard sees a slice of them.
ROW_PARALLEL_SITES = ("o_in", "down_in")


def blocked_outlier_permutation(sumsq: np.ndarray, n_outliers: int, blocks: int) -> np.ndarray:
    """`outlier_permutation` within each of ``blocks`` equal contiguous channel slices: slice ``b``
    keeps its place and gets its own ``n_outliers`` last, so the shard that holds a slice quantizes
    it alone (its own groups and outlier block)."""
    width = len(sumsq) // blocks
    return np.concatenate([b * width + outlier_permutation(sumsq[b * width:(b + 1) * width], n_outliers)
                           for b in range(blocks)])


def shared_residual_sumsq(stats: CalibrationStats, n_layers: int) -> np.ndarray:
    """The sum over every layer's norm sites of their calibration sums of squares, each normalized to
    sum 1 (so that no layer's scale dominates the choice): what the shared residual order ranks."""
    sites = [stats.sumsq_for(f"model.layers.{i}.{SITE_LINEARS[site]}") for i in range(n_layers) for site in NORM_SITES]
    return sum(sumsq / sumsq.sum() for sumsq in sites)


def _check_residual_order(residual_order: str) -> None:
    if residual_order not in RESIDUAL_ORDERS:
        raise UserError(f"residual order {residual_order!r}: use --residual-order {' or '.join(RESIDUAL_ORDERS)}")


def _check_layouts(residual_order: str, o_proj_outliers: str) -> None:
    _check_residual_order(residual_order)
    if o_proj_outliers not in O_PROJ_OUTLIERS:
        raise UserError(f"o_proj outlier layout {o_proj_outliers!r}: use --o-proj-outliers "
                        f"{' or '.join(O_PROJ_OUTLIERS)}")


@dataclasses.dataclass(frozen=True)
class MaskedOutliers:
    """One o_proj's masked-outlier input (module doc): its K inputs in ``blocks`` contiguous slices
    of ``width`` (one per tensor-parallel shard of the checkpoint), slice ``b`` expanded to
    ``[x_b * keep_b, x_b[:, outliers[b]]]``, so the expanded input is ``blocks * (width + O)`` wide."""

    width: int
    outliers: np.ndarray  # int64 [blocks, O]: each slice's outlier channels, counted within it, ascending

    @classmethod
    def choose(cls, sumsq: np.ndarray, n_outliers: int, blocks: int = 1) -> "MaskedOutliers":
        """Each slice's ``n_outliers`` largest-``sumsq`` channels (`outlier_permutation`'s choice)."""
        width = len(sumsq) // blocks
        return cls(width, np.stack([outlier_permutation(sumsq[b * width:(b + 1) * width], n_outliers)
                                    [width - n_outliers:] for b in range(blocks)]))

    @property
    def source(self) -> np.ndarray:
        """int64 [blocks * (width + O)]: the input channel each expanded channel reads."""
        return np.concatenate([b * self.width + np.concatenate([np.arange(self.width), outl])
                               for b, outl in enumerate(self.outliers)])

    @property
    def keep(self) -> np.ndarray:
        """bool [blocks * (width + O)]: False where an outlier channel is zeroed in its slice."""
        keep = np.ones((len(self.outliers), self.width + self.outliers.shape[1]), bool)
        for b, outl in enumerate(self.outliers):
            keep[b, outl] = False
        return keep.reshape(-1)


def plan_reorder(stats: CalibrationStats, n_layers: int, n_outliers: int, shards: int = 1,
                 residual_order: str = "per-layer", o_proj_outliers: str = "gathered") -> Plan:
    """Every site's permutation for layers ``0 .. n_layers-1``; with ``shards`` > 1 the row-parallel
    sites are reordered per shard slice (`blocked_outlier_permutation`); with the ``shared`` residual
    order both norm sites of every layer get `shared_residual_sumsq`'s permutation; with ``masked``
    o_proj outliers, ``stats`` are `expand_o_proj`'s and o_proj's input stays in place."""
    _check_layouts(residual_order, o_proj_outliers)

    def perm(site: str, sumsq: np.ndarray) -> np.ndarray:
        if site == "o_in" and o_proj_outliers == "masked":
            return np.arange(len(sumsq))
        if site in ROW_PARALLEL_SITES and shards > 1:
            return blocked_outlier_permutation(sumsq, n_outliers, shards)
        return outlier_permutation(sumsq, n_outliers)

    plan = {i: {site: perm(site, stats.sumsq_for(f"model.layers.{i}.{linear}"))
                for site, linear in SITE_LINEARS.items()}
            for i in range(n_layers)}
    if residual_order == "shared":
        shared = outlier_permutation(shared_residual_sumsq(stats, n_layers), n_outliers)
        for perms in plan.values():
            perms.update({site: shared for site in NORM_SITES})
    return plan


def runtime_indices(plan: Plan, residual_order: str = "per-layer", o_proj_outliers: str = "gathered") -> Plan:
    """The permutations a runtime must apply (`RUNTIME_SITES`; o_proj's only when ``gathered``), per layer."""
    sites = [site for site in RUNTIME_SITES[residual_order] if site != "o_in" or o_proj_outliers == "gathered"]
    return {i: {site: perms[site] for site in sites} for i, perms in plan.items()}


def apply_reorder(model, plan: Plan, residual_order: str = "per-layer") -> None:
    """Fold ``plan`` into the weights of ``model`` in place (see the module doc for each site); with
    the ``shared`` residual order also store the residual stream in the norm sites' order."""
    import torch

    _check_residual_order(residual_order)
    layers = model.model.layers
    with torch.no_grad():
        for i, perms in plan.items():
            layer = layers[i]
            for site, perm in perms.items():
                index = torch.as_tensor(perm, device=layer.input_layernorm.weight.device)
                for name in SITE_CONSUMERS[site]:
                    linear = layer.get_submodule(name)
                    linear.weight.copy_(linear.weight[:, index])
                if site in SITE_NORMS:
                    norm = getattr(layer, SITE_NORMS[site])
                    norm.weight.copy_(norm.weight[index])
                if site == "down_in":  # the producers: gate and up rows, in step
                    for linear in (layer.mlp.gate_proj, layer.mlp.up_proj):
                        linear.weight.copy_(linear.weight[index])
                        if linear.bias is not None:
                            linear.bias.copy_(linear.bias[index])
        if residual_order == "shared":
            _permute_residual_stream(model, plan[0]["attn_in"])


def _permute_residual_stream(model, perm: np.ndarray) -> None:
    """Store the residual stream in order ``perm``: everything that writes it (the embedding, o_proj
    and down_proj) writes channel ``perm[j]`` at ``j``, and what reads it outside the decoder norms
    (the final norm, lm_head) reads it there."""
    import torch

    index = torch.as_tensor(perm, device=model.model.embed_tokens.weight.device)
    embed = model.model.embed_tokens.weight
    embed.copy_(embed[:, index])
    for layer in model.model.layers:
        for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
            linear.weight.copy_(linear.weight[index])
            if linear.bias is not None:
                linear.bias.copy_(linear.bias[index])
    model.model.norm.weight.copy_(model.model.norm.weight[index])
    head = model.lm_head.weight
    if head.data_ptr() != embed.data_ptr():  # tied to the embedding: already permuted
        head.copy_(head[:, index])


def _gather_hook(index):
    def pre_hook(module, args):
        return (args[0].index_select(-1, index), *args[1:])
    return pre_hook


def attach_runtime_indices(model, indices: Plan) -> list:
    """Emulate the runtime indices with pre-hooks that gather each site's input; returns the handles.

    The hooks are prepended so they run before any other pre-hook (e.g. a fake quantizer) on the
    same module, which must see the reordered activation.
    """
    import torch

    handles = []
    for i, perms in indices.items():
        layer = model.model.layers[i]
        for site, perm in perms.items():
            module = getattr(layer, SITE_NORMS[site]) if site in SITE_NORMS else layer.get_submodule(
                SITE_CONSUMERS[site][0])
            index = torch.as_tensor(perm, device=layer.input_layernorm.weight.device)
            handles.append(module.register_forward_pre_hook(_gather_hook(index), prepend=True))
    return handles


def expand_o_proj(model, stats: CalibrationStats, n_outliers: int, shards: int = 1
                  ) -> tuple[CalibrationStats, dict[int, MaskedOutliers]]:
    """Give every o_proj of ``model`` (in place) the masked-outlier input of the module doc: its
    weight becomes ``W[:, source] * keep`` and a prepended forward pre-hook expands its input the
    same way, so the model computes what it did. Returns the calibration statistics of the
    expanded inputs, derived from ``stats`` (``x' = x E`` with ``E`` selecting and masking: sums of
    squares ``sumsq[source] * keep``, Hessian ``E^T H E``), and each layer's `MaskedOutliers`."""
    import torch

    sumsq, hessian = dict(stats.sumsq), dict(stats.hessian)
    masked = {}
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            name = f"model.layers.{i}.{SITE_LINEARS['o_in']}"
            site = stats.sites[name]
            masked[i] = m = MaskedOutliers.choose(stats.sumsq[site], n_outliers, shards)
            source, keep = m.source, m.keep
            sumsq[site] = stats.sumsq[site][source] * keep
            if site in stats.hessian:
                hessian[site] = stats.hessian[site][np.ix_(source, source)] * np.outer(keep, keep)
            linear = layer.self_attn.o_proj
            device = linear.weight.device
            index = torch.as_tensor(source, device=device)
            dropped = torch.as_tensor(~keep, device=device)
            linear.weight = torch.nn.Parameter(linear.weight[:, index].masked_fill(dropped, 0))
            linear.in_features = len(source)

            def expand(module, args, index=index, dropped=dropped):
                return (args[0].index_select(-1, index).masked_fill(dropped, 0), *args[1:])

            linear.register_forward_pre_hook(expand, prepend=True)
    return dataclasses.replace(stats, sumsq=sumsq, hessian=hessian), masked


@dataclasses.dataclass
class Reordered:
    """What `reorder_model` did: the plan, the runtime indices ({layer: {site: int64 [K]}}), the
    calibration statistics of the reordered model's Linear inputs before their permutation (those
    of the expanded o_proj inputs with ``masked`` o_proj outliers), and each layer's
    `MaskedOutliers` (empty when ``gathered``)."""

    plan: Plan
    indices: Plan
    stats: CalibrationStats
    masked: dict[int, MaskedOutliers]


def reorder_model(model, stats: CalibrationStats, n_outliers: int = 128, residual_order: str = "per-layer",
                  shards: int = 1, o_proj_outliers: str = "gathered") -> Reordered:
    """Plan the reorder (`plan_reorder`) and fold it into ``model`` in place, with one residual
    order and o_proj layout for both (``masked``: `expand_o_proj` first).

    The model alone is *not* equivalent to the original until the runtime indices are applied
    (by the compiled kernels, or by :func:`attach_runtime_indices` on the Hugging Face model);
    a masked o_proj expands its own input (`expand_o_proj`'s hook), so with the ``shared`` order
    and ``masked`` o_proj outliers there are none left to apply.
    """
    _check_layouts(residual_order, o_proj_outliers)
    masked = {}
    if o_proj_outliers == "masked":
        stats, masked = expand_o_proj(model, stats, n_outliers, shards)
    plan = plan_reorder(stats, len(model.model.layers), n_outliers, shards, residual_order, o_proj_outliers)
    apply_reorder(model, plan, residual_order)
    return Reordered(plan, runtime_indices(plan, residual_order, o_proj_outliers), stats, masked)
