"""Simulated quantization: quantize-dequantize in float (torch) to predict a compiled model's accuracy.

A Hugging Face Llama is turned, in place, into the float model that computes what the W4A4
kernels compute, configurable to reproduce each row of the paper's ablation:

* **weights** of every decoder Linear are replaced offline by their dequantized codes: RTN with
  `formats.quantize_sym` (the INT4/INT8 grid of the kernels), or GPTQ with `gptq.gptq`;
* **activations** at every decoder Linear input are fake-quantized per token on the fly by
  :func:`fake_quant_activation`, a torch mirror of `formats.quantize_atom_activation` followed by
  dequantization, equal to it bit for bit (tested), since it stands in for the GPU kernels;
* **outliers**: with ``n_outliers`` the model is first reordered (`reorder`), so the last
  ``n_outliers`` input channels of every Linear are the outliers, kept in float ("FP16") or INT8;
  ``residual_order`` picks Atom's per-layer norm orders or one shared order with the residual
  stream stored in it, and ``o_proj_outliers`` o_proj's outliers moved last (``gathered``) or
  zeroed in place and copied after its input (``masked``); the ``atom-w4a4`` preset is what
  `python -m atom_tvm.quantize` writes by default (shared, masked);
* **KV cache**: keys and values are fake-quantized asymmetrically per token per head
  (:func:`fake_quant_kv`, the mirror of `formats.quantize_kv_asym`). The point is where our paged
  cache stores them: TVM's paged KV cache applies RoPE to k before writing it, so the cache holds
  *post-RoPE* keys. The simulation does the same by routing attention through a registered
  transformers attention function that receives k after RoPE (and v) and quantizes both before
  the float attention; queries stay float, as in the kernels.

Embeddings, norms and the LM head stay float, as in Atom. The simulation runs in float32, so the
"fp16" preset is the float model itself.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from atom_tvm.errors import UserError
from atom_tvm.quantization import formats
from atom_tvm.quantization.calibrate import CalibrationStats, ProgressLine, decoder_linears
from atom_tvm.quantization.gptq import gptq
from atom_tvm.quantization.reorder import (O_PROJ_OUTLIERS, RESIDUAL_ORDERS, SITE_CONSUMERS, Plan,
                                           attach_runtime_indices, reorder_model)

FLOAT_BITS = 16  # "not quantized": kept in floating point
# Linear (under model.layers.N) -> the reorder site whose permutation its input columns follow.
CONSUMER_SITE = {consumer: site for site, consumers in SITE_CONSUMERS.items() for consumer in consumers}


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """One quantization scheme. Bits of 16 mean float; ``group_size`` 0 means one group per row
    (per output channel for weights, per token for activations)."""

    name: str = "custom"
    w_bits: int = FLOAT_BITS
    a_bits: int = FLOAT_BITS
    group_size: int = 0
    n_outliers: int = 0           # reordered input channels kept at outlier_bits
    outlier_bits: int = FLOAT_BITS  # 16 (float) or 8
    clip_w: float | str = 1.0     # a ratio, or "search": per tensor by formats.search_clip
    clip_a: float = 1.0
    gptq: bool = False
    kv_bits: int = FLOAT_BITS     # 16, 8 or 4, asymmetric per token per head
    residual_order: str = "per-layer"  # the norm sites' reorder: "per-layer" (the paper) or "shared"
    o_proj_outliers: str = "gathered"  # "gathered" (the paper) or "masked" (reorder.py)

    @property
    def needs_calibration(self) -> bool:
        """Reordering needs activation statistics and GPTQ needs Hessians."""
        return self.n_outliers > 0 or self.gptq

    def validate(self) -> None:
        for what, bits, allowed in (("weight", self.w_bits, (4, 8, 16)), ("activation", self.a_bits, (4, 8, 16)),
                                    ("outlier", self.outlier_bits, (8, 16)), ("KV cache", self.kv_bits, (4, 8, 16))):
            if bits not in allowed:
                raise UserError(f"{self.name}: {bits}-bit {what}s are not supported; use one of {allowed}")
        if self.group_size and self.group_size not in formats.GROUP_SIZES:
            raise UserError(f"{self.name}: group size {self.group_size} is not supported; use --group-size "
                            f"{' or '.join(map(str, formats.GROUP_SIZES))} (or 0 for one group per row)")
        if self.clip_w != "search" and not 0 < float(self.clip_w) <= 1:
            raise UserError(f"{self.name}: weight clip {self.clip_w} is outside (0, 1] (or 'search')")
        if not 0 < self.clip_a <= 1:
            raise UserError(f"{self.name}: activation clip {self.clip_a} is outside (0, 1]")
        if self.gptq and not (self.w_bits == 4 and self.group_size and
                              (self.n_outliers == 0 or self.outlier_bits == 8)):
            raise UserError(f"{self.name}: GPTQ produces Atom's layout only: 4-bit weights in groups of "
                            "64 or 128, outliers (if any) in 8 bits")
        if self.residual_order not in RESIDUAL_ORDERS:
            raise UserError(f"{self.name}: residual order {self.residual_order!r}; use "
                            f"{' or '.join(RESIDUAL_ORDERS)}")
        if self.o_proj_outliers not in O_PROJ_OUTLIERS:
            raise UserError(f"{self.name}: o_proj outlier layout {self.o_proj_outliers!r}; use "
                            f"{' or '.join(O_PROJ_OUTLIERS)}")


def _ablation_presets() -> dict[str, QuantConfig]:
    """The paper's ablation, each row adding one technique to the previous, then atom-tvm's layout
    changes, plus the baselines."""
    rows = [
        ("w4a4-rtn", dict(w_bits=4, a_bits=4)),
        ("+outliers-fp16", dict(n_outliers=formats.DEFAULT_OUTLIERS)),
        ("+outliers-int8", dict(outlier_bits=8)),
        ("+group", dict(group_size=128)),
        ("+clip", dict(clip_w=formats.WEIGHT_CLIP, clip_a=formats.ACTIVATION_CLIP)),
        ("+gptq", dict(gptq=True)),
        ("+kv4", dict(kv_bits=4)),
    ]
    # Then atom-tvm's two layout changes (reorder.py), the last being what its packages run: one
    # shared residual order, and o_proj's outliers masked in place.
    rows += [("+shared-order", dict(residual_order="shared")), ("atom-w4a4", dict(o_proj_outliers="masked"))]
    presets = {"fp16": QuantConfig("fp16")}
    cfg = QuantConfig()
    for name, change in rows:
        cfg = dataclasses.replace(cfg, name=name, **change)
        presets[name] = cfg
    presets["w8a8"] = QuantConfig("w8a8", w_bits=8, a_bits=8)
    presets["w4a16"] = QuantConfig("w4a16", w_bits=4, group_size=128)
    return presets


PRESETS = _ablation_presets()


def preset(name: str, **overrides) -> QuantConfig:
    """A named preset with optional field overrides (e.g. group_size=64 for a 576-wide model)."""
    if name not in PRESETS:
        raise UserError(f"--quantization {name!r}: choose one of {', '.join(PRESETS)}")
    cfg = dataclasses.replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
    cfg.validate()
    return cfg


# --- the number formats, mirrored in torch --------------------------------------------------------


def _fake_quant_sym(x, bits: int, group: int, clip: float):
    """torch mirror of dequantize_sym(quantize_sym(x, bits, group, clip)): same float32 steps and roundings."""
    import torch

    qmin, qmax = formats.int_range(bits)
    groups = x.float().unflatten(-1, (-1, group))
    absmax = groups.abs().amax(-1, keepdim=True)
    scale = (absmax * np.float32(clip / qmax)).half().float()
    inv = torch.where(scale != 0, 1.0 / scale, torch.zeros_like(scale))
    return (torch.round(groups * inv).clamp_(qmin, qmax) * scale).flatten(-2)


def fake_quant_rows(x, bits: int, group: int, n_outliers: int, outlier_bits: int, clip: float):
    """Quantize-dequantize the rows of ``x`` (torch, last axis = reordered channels).

    The first ``K - n_outliers`` channels get ``bits`` in groups of ``group`` (0: the whole span)
    with ``clip``; the last ``n_outliers`` get ``outlier_bits`` (16: left float) in one group,
    unclipped. With bits 4, outlier_bits 8 and a group size this is Atom's mixed format.
    """
    import torch

    normal = x.shape[-1] - n_outliers
    parts = []
    if normal:
        head = x[..., :normal]
        parts.append(head if bits == FLOAT_BITS else _fake_quant_sym(head, bits, group or normal, clip))
    if n_outliers:
        tail = x[..., normal:]
        parts.append(tail if outlier_bits == FLOAT_BITS else _fake_quant_sym(tail, outlier_bits, n_outliers, 1.0))
    return torch.cat([p.to(x.dtype) for p in parts], -1)


def fake_quant_activation(x, cfg: QuantConfig):
    """The activation ``x [..., K]`` as the W4A4 kernels see it after dynamic per-token quantization."""
    return fake_quant_rows(x, cfg.a_bits, cfg.group_size, cfg.n_outliers, cfg.outlier_bits, cfg.clip_a)


def fake_quant_kv(x, bits: int):
    """torch mirror of dequantize_kv_asym(quantize_kv_asym(x, bits)): per row of ``x [..., head_dim]``."""
    import torch

    qmax = (1 << bits) - 1
    x32 = x.float()
    zero = x32.amin(-1, keepdim=True).half().float()
    span = (x32.amax(-1, keepdim=True) - zero).clamp_min(0)
    scale = (span * np.float32(1 / qmax)).half().float()
    inv = torch.where(scale != 0, 1.0 / scale, torch.zeros_like(scale))
    q = torch.round((x32 - zero) * inv).clamp_(0, qmax)
    return (q * scale + zero).to(x.dtype)


# --- weights, offline in numpy ---------------------------------------------------------------------


def _weight_clip(w: np.ndarray, cfg: QuantConfig) -> float:
    if cfg.clip_w != "search":
        return float(cfg.clip_w)
    normal = w[:, :w.shape[1] - cfg.n_outliers]
    return formats.search_clip(normal, cfg.group_size or normal.shape[1], cfg.w_bits)


def quantize_weight(w: np.ndarray, cfg: QuantConfig, hessian: np.ndarray | None = None) -> np.ndarray:
    """The float32 values the kernels will use for weight ``w [N, K]`` (reordered input channels).

    RTN goes through `formats.quantize_sym` span by span (equal to quantize_atom_weight's layout
    when the config is Atom's); GPTQ through `gptq.gptq` with the (reordered) input Hessian.
    """
    w = np.asarray(w, np.float32)
    if cfg.w_bits == FLOAT_BITS:
        return w
    k = w.shape[1]
    if cfg.group_size:
        formats.check_atom_split(k, cfg.group_size, cfg.n_outliers)
    clip = _weight_clip(w, cfg)
    if cfg.gptq:
        return gptq(w, hessian, cfg.group_size, cfg.n_outliers, clip).dequantize()
    normal = k - cfg.n_outliers

    def rtn(part: np.ndarray, bits: int, group: int, part_clip: float) -> np.ndarray:
        return formats.dequantize_sym(*formats.quantize_sym(part, bits, group, part_clip), group)

    parts = []
    if normal:
        parts.append(rtn(w[:, :normal], cfg.w_bits, cfg.group_size or normal, clip))
    if cfg.n_outliers:
        outliers = w[:, normal:]
        parts.append(outliers if cfg.outlier_bits == FLOAT_BITS else
                     rtn(outliers, cfg.outlier_bits, cfg.n_outliers, 1.0))
    return np.concatenate(parts, axis=1)


def quantize_atom_layout(w: np.ndarray, cfg: QuantConfig, hessian: np.ndarray | None = None) -> formats.AtomWeight:
    """Reordered weight ``w [N, K]`` in the kernels' packed layout (Atom configs: INT4 groups + INT8 outliers)."""
    if not (cfg.w_bits == 4 and cfg.group_size and (cfg.n_outliers == 0 or cfg.outlier_bits == 8)):
        raise UserError(f"{cfg.name}: the packed layout holds 4-bit weights in groups with INT8 outliers")
    w = np.asarray(w, np.float32)
    clip = _weight_clip(w, cfg)
    if cfg.gptq:
        return gptq(w, hessian, cfg.group_size, cfg.n_outliers, clip)
    return formats.quantize_atom_weight(w, cfg.group_size, cfg.n_outliers, clip)


# --- putting it together -----------------------------------------------------------------------------


def _use_kv_quant_attention(model, bits: int) -> None:
    """Route attention through a function that fake-quantizes k (after RoPE) and v first."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward

    inner_name = model.config._attn_implementation
    if inner_name.startswith("atom-kv"):
        raise UserError("the model already simulates a quantized KV cache; load a fresh model")
    inner = eager_attention_forward if inner_name == "eager" else ALL_ATTENTION_FUNCTIONS[inner_name]

    def attention(module, query, key, value, attention_mask, **kwargs):
        # key/value: [batch, kv_heads, tokens, head_dim]; quantized per token per head (last axis).
        return inner(module, query, fake_quant_kv(key, bits), fake_quant_kv(value, bits), attention_mask, **kwargs)

    name = f"atom-kv{bits}-{inner_name}"
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner_name])
    model.set_attn_implementation(name)


def reordered_hessian(stats: CalibrationStats, plan: Plan | None, linear_name: str) -> np.ndarray:
    """A Linear's input Hessian (collected on the original model) in its reordered channel order."""
    hessian = stats.hessian_for(linear_name)
    if plan is None:
        return hessian
    layer, _, suffix = linear_name.removeprefix("model.layers.").partition(".")
    perm = plan[int(layer)][CONSUMER_SITE[suffix]]
    return hessian[np.ix_(perm, perm)]


def simulate(model, cfg: QuantConfig, stats: CalibrationStats | None = None, progress: bool = True):
    """Turn the float Llama ``model`` into ``cfg``'s simulation, in place; returns it.

    ``stats`` (from calibrate, on the unmodified model) is needed when ``cfg.needs_calibration``;
    GPTQ also needs its Hessians.
    """
    import torch

    cfg.validate()
    if cfg.needs_calibration and stats is None:
        raise UserError(f"{cfg.name} needs calibration statistics (outlier reorder / GPTQ)")
    plan = None
    if cfg.n_outliers:
        reordered = reorder_model(model, stats, cfg.n_outliers, cfg.residual_order,
                                  o_proj_outliers=cfg.o_proj_outliers)
        attach_runtime_indices(model, reordered.indices)
        plan, stats = reordered.plan, reordered.stats

    linears = decoder_linears(model)
    quantize_weights = cfg.w_bits != FLOAT_BITS
    bar = ProgressLine(f"quantize {cfg.name}", len(linears), "linears") if progress and quantize_weights else None
    with torch.no_grad():
        for done, (name, linear) in enumerate(linears.items(), 1):
            if quantize_weights:
                hessian = reordered_hessian(stats, plan, name) if cfg.gptq else None
                w = quantize_weight(linear.weight.detach().cpu().numpy(), cfg, hessian)
                linear.weight.copy_(torch.from_numpy(w))
            if cfg.a_bits != FLOAT_BITS:
                linear.register_forward_pre_hook(lambda module, args: (fake_quant_activation(args[0], cfg), *args[1:]))
            if bar:
                bar.update(done)
    if bar:
        bar.close()
    if cfg.kv_bits != FLOAT_BITS:
        _use_kv_quant_attention(model, cfg.kv_bits)
    return model
