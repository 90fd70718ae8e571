"""atom_tvm.quantization.simulate: torch fake quantization equal to the numpy formats, the presets,
the KV quantization point (keys after RoPE), and whole simulated models."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from atom_tvm.errors import UserError
from atom_tvm.quantization import formats
from atom_tvm.quantization.gptq import gptq

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from atom_tvm.quantization.calibrate import collect_stats  # noqa: E402
from atom_tvm.quantization.reorder import plan_reorder  # noqa: E402
from atom_tvm.quantization.simulate import (PRESETS, QuantConfig, fake_quant_activation, fake_quant_kv,  # noqa: E402
                                            preset, quantize_weight, simulate)
from test_calibrate import random_windows, tiny_llama  # noqa: E402


def heavy_tailed(shape, seed=0) -> np.ndarray:
    """Rows with a few loud channels, like LLM activations, plus an all-zero row and a tie-rich row."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * np.exp(1.5 * rng.standard_normal(shape[-1]))
    x[0] = 0.0
    x[1] = np.round(x[1] * 4) / 4  # exact multiples land on rounding ties
    return x.astype(np.float32)


@pytest.mark.parametrize("group,n_outliers,clip", [(64, 128, 0.9), (128, 128, 1.0), (64, 0, 0.85), (64, 64, 0.9)])
def test_activation_fake_quant_equals_formats(group, n_outliers, clip):
    x = heavy_tailed((5, 768))
    cfg = QuantConfig(a_bits=4, group_size=group, n_outliers=n_outliers, outlier_bits=8, clip_a=clip)
    expected = formats.quantize_atom_activation(x, group, n_outliers, clip).dequantize()
    assert np.array_equal(fake_quant_activation(torch.from_numpy(x), cfg).numpy(), expected)
    # Leading batch dimensions are tokens too.
    batched = fake_quant_activation(torch.from_numpy(x).reshape(1, 5, 768), cfg).reshape(5, 768).numpy()
    assert np.array_equal(batched, expected)


def test_other_activation_formats_equal_quantize_sym():
    x = heavy_tailed((6, 256), seed=1)

    def sym(part, bits, group, clip=1.0):
        return formats.dequantize_sym(*formats.quantize_sym(part, bits, group, clip), group)

    per_token4 = fake_quant_activation(torch.from_numpy(x), PRESETS["w4a4-rtn"]).numpy()
    assert np.array_equal(per_token4, sym(x, 4, 256))
    assert np.array_equal(fake_quant_activation(torch.from_numpy(x), PRESETS["w8a8"]).numpy(), sym(x, 8, 256))
    fp_outliers = fake_quant_activation(torch.from_numpy(x), QuantConfig(a_bits=4, n_outliers=64, clip_a=0.9)).numpy()
    assert np.array_equal(fp_outliers[:, :192], sym(x[:, :192], 4, 192, 0.9))
    assert np.array_equal(fp_outliers[:, 192:], x[:, 192:])


@pytest.mark.parametrize("bits", [4, 8])
def test_kv_fake_quant_equals_formats(bits):
    x = heavy_tailed((4, 3, 64), seed=2)
    x[2, 1] = 0.37  # a constant row: zero span
    expected = formats.dequantize_kv_asym(*formats.quantize_kv_asym(x, bits), bits)
    assert np.array_equal(fake_quant_kv(torch.from_numpy(x), bits).numpy(), expected)


def test_weights_go_through_formats_and_gptq():
    w = heavy_tailed((96, 320), seed=3)
    atom = QuantConfig(w_bits=4, group_size=64, n_outliers=64, outlier_bits=8, clip_w=0.85)
    assert np.array_equal(quantize_weight(w, atom), formats.quantize_atom_weight(w, 64, 64, 0.85).dequantize())
    x = np.random.default_rng(4).standard_normal((400, 320))
    h = x.T @ x
    with_gptq = dataclasses.replace(atom, gptq=True)
    assert np.array_equal(quantize_weight(w, with_gptq, h), gptq(w, h, 64, 64, 0.85).dequantize())
    per_channel8 = formats.dequantize_sym(*formats.quantize_sym(w, 8, 320), 320)
    assert np.array_equal(quantize_weight(w, PRESETS["w8a8"]), per_channel8)
    assert np.array_equal(quantize_weight(w, PRESETS["fp16"]), w)
    searched = dataclasses.replace(atom, clip_w="search")
    best = formats.search_clip(w[:, :256], 64, 4)
    assert np.array_equal(quantize_weight(w, searched), formats.quantize_atom_weight(w, 64, 64, best).dequantize())


def test_presets_are_the_ablation_rows():
    rows = ["w4a4-rtn", "+outliers-fp16", "+outliers-int8", "+group", "+clip", "+gptq", "+kv4", "+shared-order",
            "atom-w4a4"]
    changed = [{"w_bits", "a_bits"}, {"n_outliers"}, {"outlier_bits"}, {"group_size"}, {"clip_w", "clip_a"},
               {"gptq"}, {"kv_bits"}, {"residual_order"}, {"o_proj_outliers"}]
    previous = dataclasses.asdict(PRESETS["fp16"])
    for name, fields in zip(rows, changed):
        now = dataclasses.asdict(PRESETS[name])
        assert {k for k in now if now[k] != previous[k]} - {"name"} == fields, name
        previous = now
    atom = PRESETS["atom-w4a4"]
    assert PRESETS["+kv4"].residual_order == "per-layer" and atom.residual_order == "shared"
    assert PRESETS["+kv4"].o_proj_outliers == "gathered" and atom.o_proj_outliers == "masked"
    assert (atom.w_bits, atom.a_bits, atom.group_size, atom.n_outliers, atom.outlier_bits, atom.kv_bits) == \
        (4, 4, 128, 128, 8, 4)
    assert atom.needs_calibration and not PRESETS["w8a8"].needs_calibration
    assert preset("+group", group_size=64).group_size == 64
    with pytest.raises(UserError, match="choose one of"):
        preset("w3a3")
    with pytest.raises(UserError, match="group size 96"):
        preset("+group", group_size=96)
    with pytest.raises(UserError, match="GPTQ"):
        preset("+gptq", group_size=0)


def test_kv_is_quantized_after_rope(monkeypatch):
    """simulate() must equal quantizing k after RoPE (what the paged cache stores) and v, per head."""
    model, x = tiny_llama(seed=1), torch.as_tensor(random_windows(2, 24, seed=5))
    llama = transformers.models.llama.modeling_llama
    rope = llama.apply_rotary_pos_emb

    def reference_logits(quantize_k_after_rope: bool):
        def patched(q, k, cos, sin, *args, **kwargs):
            if not quantize_k_after_rope:
                k = fake_quant_kv(k, 4)
            q, k = rope(q, k, cos, sin, *args, **kwargs)
            return q, fake_quant_kv(k, 4) if quantize_k_after_rope else k

        head_dim = model.config.head_dim
        hooks = [layer.self_attn.v_proj.register_forward_hook(
            lambda m, a, out: fake_quant_kv(out.unflatten(-1, (-1, head_dim)), 4).flatten(-2))
            for layer in model.model.layers]
        with monkeypatch.context() as m, torch.no_grad():
            m.setattr(llama, "apply_rotary_pos_emb", patched)
            logits = model(x).logits
        for h in hooks:
            h.remove()
        return logits

    after, before = reference_logits(True), reference_logits(False)
    with torch.no_grad():
        simulated = simulate(model, QuantConfig("kv4", kv_bits=4))(x).logits
    assert torch.allclose(simulated, after, rtol=0, atol=1e-5)
    assert (simulated - before).abs().max() > 1e-3  # the test can tell where the quantizer sits


def test_simulated_models_on_tiny_llama():
    float_model = tiny_llama(seed=2)
    stats = collect_stats(float_model, random_windows(4, 64, seed=6), hessian=True)
    x = torch.as_tensor(random_windows(2, 48, seed=7))
    with torch.no_grad():
        ref = float_model(x).logits

    def error(name: str, **overrides) -> float:
        model = simulate(tiny_llama(seed=2), preset(name, **overrides), stats)
        with torch.no_grad():
            out = model(x).logits
        assert torch.isfinite(out).all()
        return float((out - ref).norm() / ref.norm())

    atom = dict(group_size=64, n_outliers=64)
    errors = {"fp16": error("fp16"), "w8a8": error("w8a8"), "w4a4-rtn": error("w4a4-rtn"),
              "+outliers-int8": error("+outliers-int8", n_outliers=64), "atom-w4a4": error("atom-w4a4", **atom)}
    assert errors["fp16"] == 0.0
    assert errors["w8a8"] < errors["atom-w4a4"] < errors["w4a4-rtn"]
    assert errors["+outliers-int8"] < errors["w4a4-rtn"]

    # GPTQ ran on the reordered weight with the Hessian permuted the same way; under the shared
    # residual order down_proj's rows write the residual stream in the norm sites' order.
    model = simulate(tiny_llama(seed=2), preset("atom-w4a4", **atom), stats)
    plan = plan_reorder(stats, 2, 64, residual_order="shared")
    perm, rows = plan[1]["down_in"], plan[0]["attn_in"]
    w = float_model.model.layers[1].mlp.down_proj.weight.detach().numpy()[rows][:, perm]
    h = stats.hessian_for("model.layers.1.mlp.down_proj")[np.ix_(perm, perm)]
    expected = quantize_weight(w, preset("atom-w4a4", **atom), h)
    assert np.array_equal(model.model.layers[1].mlp.down_proj.weight.detach().numpy(), expected)

    with pytest.raises(UserError, match="needs calibration"):
        simulate(tiny_llama(seed=2), preset("+outliers-fp16", n_outliers=64))
