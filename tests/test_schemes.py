"""Quantization schemes: each scheme's quantized modules compiled for llvm against numpy references,
the build-time weight quantization against the simulation's, and the registry's input checks.

The modules are compiled alone through the package pipeline (`atom_tvm.compile.compile_module`) on
fresh random inputs, with dynamic M, at M = 1 (decode) and M = 7, with and without the residual the
block-ending projections add. References:

* atom-w4a4: the kernel families' numpy definitions (`tir_kernels.quantize.*_ref`,
  `w4a4_gemm_reference`), which the CPU kernels match bit for bit; the module must wire the
  kernels, shapes and parameters so that the whole module is bit-exact too. SiLU-mul's ``exp`` is
  libm's on the CPU (within 0.5 ulp), so its codes may differ at a rounding tie (`tir_kernels.quantize`).
* w8a8: `formats.quantize_sym` per token (the simulation's activation numerics) and
  `int8_gemm_reference`: bit-exact.
* w4a16: the float64 product of x with the dequantized weight (rounded once to float16) within
  `fp16_tolerance` (float32 sums in any order).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.relax.frontend import nn

from atom_tvm.compile import compile_module
from atom_tvm.errors import UserError
from atom_tvm.quantization import formats
from atom_tvm.quantization.schemes import SchemeOptions, names, resolve
from atom_tvm.quantization.schemes.atom_w4a4 import (AtomLayout, MaskedOutliersW4A4Linear, PackedActivation,
                                                     ReorderQuantizeW4A4Linear, RMSNormQuantize, SiLUMulQuantize,
                                                     W4A4Linear)
from atom_tvm.quantization.schemes.w4a16 import W4A16, W4A16Linear
from atom_tvm.quantization.schemes.w8a8 import W8A8Linear
from atom_tvm.quantization.schemes.w8a8 import quantize_weight as w8a8_weight
from deploy.targets import make_target
from relax_models.llama import LlamaConfig
from tir_kernels import quantize as qk
from tir_kernels.dense_gemm import fp16_gemm_reference, fp16_tolerance, int8_gemm_reference
from tir_kernels.w4a4_gemm import w4a4_gemm_reference

LLVM = make_target("llvm", [])
ROWS = (1, 7)


def compiled(module: nn.Module, inputs: dict[str, nn.spec.Tensor], params: dict):
    """``module.forward`` compiled with ``inputs`` (dynamic "m") and ``params`` bound: a function of
    numpy inputs returning the list of numpy outputs."""
    mod, named = module.export_tvm(spec={"forward": {**inputs, "$": {"param_mode": "plain", "effect_mode": "none"}}})
    vm = relax.VirtualMachine(compile_module(mod, LLVM, []), tvm.cpu())
    bound = [tvm.runtime.tensor(params[name], tvm.cpu()) for name, _ in named]

    def call(*arrays: np.ndarray) -> list[np.ndarray]:
        out = vm["forward"](*[tvm.runtime.tensor(a, tvm.cpu()) for a in arrays], *bound)
        return [o.numpy() for o in out] if isinstance(out, (list, tuple, tvm.ir.Array)) else [out.numpy()]

    return call


def fp16(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float16)


def assert_packed_equal(got: list[np.ndarray], want, codes_may_differ=0.0):
    """q4, s4, q8, s8 equal; with ``codes_may_differ``, that fraction of codes may be one step off."""
    for field, g in zip(("q4", "s4", "q8", "s8"), got):
        w = getattr(want, field)
        if not codes_may_differ or field in ("s4", "s8"):
            np.testing.assert_array_equal(g, w, err_msg=field)
            continue
        gi = formats.unpack_int4(g) if field == "q4" else g.astype(np.int32)
        wi = formats.unpack_int4(w) if field == "q4" else w.astype(np.int32)
        off = np.abs(gi.astype(np.int32) - wi)
        assert off.max() <= 1 and np.mean(off > 0) <= codes_may_differ, (field, off.max(), np.mean(off > 0))


# --- atom-w4a4 -----------------------------------------------------------------------------------

class TensorsOut(nn.Module):
    """Exposes a module returning a PackedActivation as one returning its four tensors."""

    def __init__(self, inner: nn.Module):
        self.inner = inner

    def forward(self, x: nn.Tensor):
        return tuple(self.inner(x).tensors)


class PackedIn(nn.Module):
    """Feeds a W4A4Linear a PackedActivation made of four input tensors (and maybe a residual)."""

    def __init__(self, inner: W4A4Linear):
        self.inner = inner

    def forward(self, q4, s4, q8, s8, residual=None):
        return self.inner(PackedActivation(q4, s4, q8, s8, (q4.shape[0],)), residual)


LAYOUTS = [AtomLayout(64, 64, 0.9), AtomLayout(128, 128, 0.9)]


def random_atom_weight(rng, n: int, k: int, lay: AtomLayout) -> dict[str, np.ndarray]:
    w = formats.quantize_atom_weight(rng.standard_normal((n, k)).astype(np.float32) * 0.05,
                                     lay.group_size, lay.n_outliers, 0.85)
    return {"q4": w.q4, "s4": w.s4, "q8": w.q8, "s8": w.s8}


@pytest.mark.parametrize("lay", LAYOUTS, ids=lambda lay: f"g{lay.group_size}o{lay.n_outliers}")
def test_atom_rmsnorm_and_silu_quantizers(lay):
    rng = np.random.default_rng(lay.group_size)
    h, inter, eps = 384, 640, 1e-5
    weight = (1 + 0.3 * rng.standard_normal(h)).astype(np.float16)
    index = rng.permutation(h).astype(np.int32)
    x_spec = {"x": nn.spec.Tensor([1, "m", h], "float16")}
    norm_fn = compiled(TensorsOut(RMSNormQuantize(h, eps, lay, LLVM, reorder=True)), x_spec,
                       {"inner.weight": weight, "inner.reorder_index": index})
    inorder_fn = compiled(TensorsOut(RMSNormQuantize(h, eps, lay, LLVM, reorder=False)), x_spec,
                          {"inner.weight": weight})
    silu_fn = compiled(TensorsOut(SiLUMulQuantize(inter, lay, LLVM)),
                       {"x": nn.spec.Tensor(["m", 1, 2 * inter], "float16")}, {})
    for m in ROWS:
        x = fp16(rng, 1, m, h, scale=3.0)
        assert_packed_equal(norm_fn(x), qk.rmsnorm_reorder_quantize_ref(x[0], weight, index, lay.group_size,
                                                                        lay.n_outliers, lay.clip, eps))
        assert_packed_equal(inorder_fn(x), qk.rmsnorm_quantize_ref(x[0], weight, lay.group_size, lay.n_outliers,
                                                                   lay.clip, eps))
        gate_up = fp16(rng, m, 1, 2 * inter, scale=2.0)
        assert_packed_equal(silu_fn(gate_up), qk.silu_mul_quantize_ref(gate_up[:, 0], lay.group_size,
                                                                       lay.n_outliers, lay.clip),
                            codes_may_differ=1e-3)


@pytest.mark.parametrize("lay", LAYOUTS, ids=lambda lay: f"g{lay.group_size}o{lay.n_outliers}")
def test_atom_w4a4_linears(lay):
    rng = np.random.default_rng(7 + lay.group_size)
    k, n = 384, 256
    w = random_atom_weight(rng, n, k, lay)
    index = rng.permutation(k).astype(np.int32)
    spec = {f: nn.spec.Tensor(list(s), d) for f, (s, d) in zip(("q4", "s4", "q8", "s8"), lay.packed_shapes("m", k))}
    params = {f"inner.{f}": a for f, a in w.items()}
    plain_fn = compiled(PackedIn(W4A4Linear(k, n, lay, LLVM)), spec, params)
    residual_fn = compiled(PackedIn(W4A4Linear(k, n, lay, LLVM)),
                           {**spec, "residual": nn.spec.Tensor(["m", n], "float16")}, params)
    # o_proj: quantize at run time (gathered: reorder + quantize; masked: the K + O channels of the
    # outliers masked in place and copied, against a weight K + O wide), then the GEMM with the residual.
    attn_spec = {"x": nn.spec.Tensor([1, "m", k], "float16"), "residual": nn.spec.Tensor([1, "m", n], "float16")}
    o_proj_fn = compiled(ReorderQuantizeW4A4Linear(k, n, lay, LLVM), attn_spec, {**w, "reorder_index": index})
    outliers = rng.choice(k, lay.n_outliers, replace=False).astype(np.int32)
    w_masked = random_atom_weight(rng, n, k + lay.n_outliers, lay)
    masked_fn = compiled(MaskedOutliersW4A4Linear(k, n, lay, LLVM), attn_spec,
                         {**w_masked, "outlier_index": outliers, "outlier_mask": formats.outlier_mask(outliers, k)})
    for m in ROWS:
        x = formats.quantize_atom_activation(rng.standard_normal((m, k)).astype(np.float32) * 2,
                                             lay.group_size, lay.n_outliers, lay.clip)
        residual = fp16(rng, m, n)
        args = [x.q4, x.s4, x.q8, x.s8]
        np.testing.assert_array_equal(plain_fn(*args)[0], w4a4_gemm_reference(*args, *w.values(), lay.group_size))
        np.testing.assert_array_equal(residual_fn(*args, residual)[0],
                                      w4a4_gemm_reference(*args, *w.values(), lay.group_size, residual))
        attn = fp16(rng, 1, m, k, scale=2.0)
        got = o_proj_fn(attn, residual[None])[0]
        xq = qk.reorder_quantize_ref(attn[0], index, lay.group_size, lay.n_outliers, lay.clip)
        want = w4a4_gemm_reference(xq.q4, xq.s4, xq.q8, xq.s8, *w.values(), lay.group_size, residual)
        np.testing.assert_array_equal(got[0], want)
        xq = qk.outlier_mask_quantize_ref(attn[0], outliers, lay.group_size, lay.n_outliers, lay.clip)
        want = w4a4_gemm_reference(xq.q4, xq.s4, xq.q8, xq.s8, *w_masked.values(), lay.group_size, residual)
        np.testing.assert_array_equal(masked_fn(attn, residual[None])[0][0], want)


@pytest.mark.parametrize("residual_order", ["per-layer", "shared"])
def test_atom_checkpoint_norm_weight_reaches_the_kernel_in_its_order(residual_order, tmp_path):
    """The checkpoint stores w[P] (`norm(x[P]) * w[P]`). Per-layer order: the kernel scales source
    channel P[j] by weight[P[j]], so the scheme scatters the weight back. Shared order: the residual
    stream is stored as x[P] and the kernel reads x[P] and w[P] in order. Either way what the kernel
    computes from what the scheme hands it must give the design's float64 formula."""
    from safetensors.numpy import save_file

    from atom_tvm.quantization.schemes.atom_w4a4 import AtomW4A4

    rng = np.random.default_rng(3)
    h = 64
    w_orig = (1 + 0.5 * rng.standard_normal(h)).astype(np.float16)
    perm = rng.permutation(h).astype(np.int32)
    name = "model.layers.0.input_layernorm"
    tensors = {f"{name}.weight": w_orig[perm]}
    if residual_order == "per-layer":
        tensors[f"{name}.reorder_index"] = perm
    save_file(tensors, str(tmp_path / "model.safetensors"))
    expected = [(n, (h,), "float16" if n.endswith("weight") else "int32") for n in tensors]
    got = dict(AtomW4A4(LAYOUTS[0], 4, {"residual_order": residual_order, "o_proj_outliers": "masked"}
                        ).params(tmp_path, expected))
    x = rng.standard_normal((5, h))
    rs = 1 / np.sqrt(np.mean(x**2, axis=1, keepdims=True) + 1e-5)
    design = (x[:, perm] * rs) * w_orig[perm].astype(np.float64)
    if residual_order == "per-layer":
        kernel = qk.rmsnorm_ref(x.astype(np.float16), got[f"{name}.weight"], 1e-5)[:, got[f"{name}.reorder_index"]]
    else:
        kernel = qk.rmsnorm_ref(x[:, perm].astype(np.float16), got[f"{name}.weight"], 1e-5)
    np.testing.assert_allclose(kernel, design, rtol=2e-3, atol=2e-3)


# --- w8a8 and w4a16 ------------------------------------------------------------------------------

def test_w8a8_linear():
    rng = np.random.default_rng(11)
    k, n = 320, 192
    w = w8a8_weight(rng.standard_normal((n, k)).astype(np.float32) * 0.05)
    fn = compiled(W8A8Linear(k, n, LLVM), {"x": nn.spec.Tensor(["m", 1, k], "float16"),
                                           "residual": nn.spec.Tensor(["m", 1, n], "float16")}, w)
    for m in ROWS:
        x = fp16(rng, m, 1, k, scale=2.0)
        x[:, 0, 5] = 40.0  # an outlier channel, as in real activations
        residual = fp16(rng, m, 1, n)
        got = fn(x, residual)[0]
        xq, xs = formats.quantize_sym(x[:, 0].astype(np.float32), 8, k)
        np.testing.assert_array_equal(got[:, 0], int8_gemm_reference(xq, xs, w["q8"], w["s8"], residual[:, 0]))


@pytest.mark.parametrize("group", [64, 128])
def test_w4a16_linear(group):
    rng = np.random.default_rng(group)
    k, n = 384, 256
    scheme = W4A16(group)
    w = scheme.quantize_weight(rng.standard_normal((n, k)).astype(np.float32) * 0.05)
    w_deq = formats.dequantize_sym(formats.unpack_int4(w["q4"]), w["s4"], group).astype(np.float16)
    fn = compiled(W4A16Linear(k, n, group, LLVM), {"x": nn.spec.Tensor(["m", k], "float16"),
                                                   "residual": nn.spec.Tensor(["m", n], "float16")}, w)
    for m in ROWS:
        x = fp16(rng, m, k)
        residual = fp16(rng, m, n)
        got = fn(x, residual)[0]
        want = fp16_gemm_reference(x, w_deq, residual)
        err = np.abs(got.astype(np.float64) - want.astype(np.float64))
        assert (err <= fp16_tolerance(x, w_deq, want)).all(), err.max()


@pytest.mark.parametrize("name", ["w4a16", "w8a8"])
def test_build_time_weights_equal_the_simulation(name):
    """The weights a w4a16/w8a8 build writes dequantize to what the simulation's preset uses."""
    from atom_tvm.quantization.simulate import preset, quantize_weight

    rng = np.random.default_rng(5)
    w = rng.standard_normal((128, 256)).astype(np.float32) * 0.05
    if name == "w4a16":
        packed = W4A16(64).quantize_weight(w)
        ours = formats.dequantize_sym(formats.unpack_int4(packed["q4"]), packed["s4"], 64)
        sim = quantize_weight(w, preset("w4a16", group_size=64))
    else:
        packed = w8a8_weight(w)
        ours = packed["q8"].astype(np.float32) * packed["s8"].astype(np.float32)
        sim = quantize_weight(w, preset("w8a8"))
    np.testing.assert_array_equal(ours, sim)


# --- registry ------------------------------------------------------------------------------------

SMALL = LlamaConfig.from_hf_dict({"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
                                  "num_attention_heads": 9, "num_key_value_heads": 3, "num_hidden_layers": 1,
                                  "vocab_size": 512})


def test_registry_lists_every_scheme_and_refuses_bad_options(tmp_path):
    every = ["fp32", "fp16", "w4a16", "w8a8", "atom-w4a4"]
    assert sorted(names()) == sorted(every)
    cases = [
        (lambda: resolve("int3", tmp_path, SMALL), ["int3", *every]),
        (lambda: resolve("w8a8", tmp_path, SMALL, SchemeOptions(group_size=64)), ["--group-size", "w8a8"]),
        (lambda: resolve("w4a16", tmp_path, SMALL), ["576", "--group-size 64"]),
        (lambda: resolve("atom-w4a4", tmp_path, SMALL), ["atom_quant_config.json", "atom_tvm.quantize"]),
    ]
    for call, needles in cases:
        with pytest.raises(UserError) as err:
            call()
        for needle in needles:
            assert needle in str(err.value), (needle, str(err.value))
    assert resolve("w4a16", tmp_path, SMALL, SchemeOptions(group_size=64)).group_size == 64

    (tmp_path / "atom_quant_config.json").write_text(json.dumps(
        {"layout_version": 1, "scheme": "atom-w4a4", "config": {"w_bits": 4, "a_bits": 4, "outlier_bits": 8,
                                                                 "kv_bits": 4, "group_size": 128, "n_outliers": 128,
                                                                 "clip_a": 0.9, "clip_w": 0.85, "gptq": True}}))
    with pytest.raises(UserError, match="qkv_proj .960x576, group 128.*multiple of the group size 128"):
        resolve("atom-w4a4", tmp_path, SMALL)  # SmolLM2's 576 channels need G = 64


def test_atom_quant_config_layouts_and_residual_order(tmp_path):
    """Layout 1 checkpoints (before the residual order existed) read as per-layer; layout 2 carries
    the order; layouts 1 and 2 (before the o_proj outlier layout existed) read as gathered, layout 3
    carries it; an unknown layout, order or o_proj layout is refused with the command that rewrites
    the checkpoint."""
    from atom_tvm.quantization.schemes.atom_w4a4 import read_quant_config

    config = {"w_bits": 4, "a_bits": 4, "outlier_bits": 8, "kv_bits": 4, "group_size": 128, "n_outliers": 128,
              "clip_a": 0.9, "clip_w": 0.85, "gptq": True}

    def read(layout, **fields):
        (tmp_path / "atom_quant_config.json").write_text(json.dumps(
            {"layout_version": layout, "scheme": "atom-w4a4", "config": {**config, **fields}}))
        return read_quant_config(tmp_path)

    assert read(1)["residual_order"] == "per-layer" and read(1)["o_proj_outliers"] == "gathered"
    assert read(2, residual_order="shared")["residual_order"] == "shared"
    assert read(2, residual_order="per-layer")["residual_order"] == "per-layer"
    assert read(2, residual_order="shared")["o_proj_outliers"] == "gathered"
    assert read(3, residual_order="shared", o_proj_outliers="masked")["o_proj_outliers"] == "masked"
    with pytest.raises(UserError, match="layout 4 .*python -m atom_tvm.quantize"):
        read(4, residual_order="shared")
    with pytest.raises(UserError, match="residual order 'global'.*python -m atom_tvm.quantize"):
        read(2, residual_order="global")
    with pytest.raises(UserError, match="o_proj outlier layout 'scattered'.*python -m atom_tvm.quantize"):
        read(3, residual_order="shared", o_proj_outliers="scattered")
