"""`python -m atom_tvm.quantize` on the real SmolLM2 with a reduced calibration, and its input checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from atom_tvm.quantization.formats import outlier_mask
from cli import assert_user_error, run_module

pytest.importorskip("torch")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

CALIB = ("--calib-windows", "2", "--calib-window-length", "128", "--group-size", "64")


@pytest.fixture(scope="module")
def checkpoints(smollm2_dir, tmp_path_factory):
    """RTN and GPTQ checkpoints from the same calibration windows."""
    out = {}
    for name, extra in (("rtn", ["--no-gptq"]), ("gptq", [])):
        path = tmp_path_factory.mktemp("atom") / name
        proc = run_module("atom_tvm.quantize", "--model", smollm2_dir, "-o", path, *CALIB, *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[name] = path
    return out


def load(path):
    return safetensors_numpy.load_file(str(path / "model.safetensors"))


def dequantize(tensors, name, group_size=64, n_outliers=128):
    from atom_tvm.quantization.formats import AtomWeight

    return AtomWeight(*(tensors[f"{name}.{f}"] for f in ("q4", "s4", "q8", "s8")), group_size, n_outliers).dequantize()


def test_checkpoint_layout(checkpoints):
    t = load(checkpoints["gptq"])
    qkv = "model.layers.0.self_attn.qkv_proj"
    assert t[qkv + ".q4"].shape == (960, 224) and t[qkv + ".q4"].dtype == np.uint8  # (9+3+3)*64 rows, 448/2
    assert t[qkv + ".s4"].shape == (960, 7) and t[qkv + ".s4"].dtype == np.float16
    assert t[qkv + ".q8"].shape == (960, 128) and t[qkv + ".q8"].dtype == np.int8
    assert t[qkv + ".s8"].shape == (960, 1)
    assert t["model.layers.29.mlp.down_proj.q4"].shape == (576, 704)  # (1536-128)/2
    assert t["model.layers.0.mlp.gate_up_proj.s4"].shape == (3072, 7)
    # The default shared residual order and masked o_proj outliers: no input is gathered at run time;
    # o_proj multiplies its 576 channels in place (outliers zeroed) and the 128 outliers again.
    o_proj = "model.layers.3.self_attn.o_proj"
    assert t[o_proj + ".q4"].shape == (576, 288) and t[o_proj + ".s4"].shape == (576, 9)
    index = t[o_proj + ".outlier_index"]
    assert index.dtype == np.int32 and index.shape == (128,) and np.all(np.diff(index) > 0)
    assert 0 <= index[0] and index[-1] < 576
    np.testing.assert_array_equal(t[o_proj + ".outlier_mask"], outlier_mask(index, 576))
    assert not [name for name in t if name.endswith("reorder_index")]
    assert "lm_head.weight" not in t and t["model.embed_tokens.weight"].dtype == np.float16
    config = json.loads((checkpoints["gptq"] / "atom_quant_config.json").read_text())
    assert config["layout_version"] == 3 and config["config"]["residual_order"] == "shared"
    assert config["config"]["o_proj_outliers"] == "masked"
    assert config["config"]["gptq"] and config["config"]["group_size"] == 64
    assert config["calibration"]["windows"] == 2 and config["calibration"]["split"] == "train"
    assert (checkpoints["gptq"] / "tokenizer.json").is_file()


def test_rtn_checkpoint_equals_the_simulation_and_gptq_beats_it_on_calibration_data(checkpoints, smollm2_dir):
    """The checkpoint holds exactly the weights the simulation predicts (RTN through the simulation's
    independent per-span path, o_proj's expanded by the masked outliers), and the residual stream's
    tensors in its stored order; on the calibration Hessians GPTQ's layer output error is lower."""
    from atom_tvm.quantization.calibrate import calibrate, load_float_model
    from atom_tvm.quantization.reorder import reorder_model
    from atom_tvm.quantization.simulate import preset, quantize_weight, reordered_hessian

    stats = calibrate(smollm2_dir, "wikipedia", "train", 2, 128, hessian=True, progress=False)
    model = load_float_model(smollm2_dir)
    embed = model.model.embed_tokens.weight.detach().numpy().copy()
    reordered = reorder_model(model, stats, 128, "shared", o_proj_outliers="masked")
    plan, stats = reordered.plan, reordered.stats
    rtn_cfg = preset("atom-w4a4", group_size=64, gptq=False)
    rtn, gptq = load(checkpoints["rtn"]), load(checkpoints["gptq"])
    np.testing.assert_array_equal(rtn["model.embed_tokens.weight"], embed[:, plan[0]["attn_in"]].astype(np.float16))
    for layer in (0, 17):
        prefix = f"model.layers.{layer}."
        w = model.model.layers[layer].mlp.down_proj.weight.detach().numpy()
        np.testing.assert_array_equal(dequantize(rtn, prefix + "mlp.down_proj"), quantize_weight(w, rtn_cfg))
        q = model.model.layers[layer].self_attn.q_proj.weight.detach().numpy()
        np.testing.assert_array_equal(dequantize(rtn, prefix + "self_attn.qkv_proj")[:576], quantize_weight(q, rtn_cfg))
        o = model.model.layers[layer].self_attn.o_proj.weight.detach().numpy()
        assert o.shape == (576, 576 + 128) and not o[:, reordered.masked[layer].outliers[0]].any()
        np.testing.assert_array_equal(dequantize(rtn, prefix + "self_attn.o_proj"), quantize_weight(o, rtn_cfg))
        np.testing.assert_array_equal(rtn[prefix + "self_attn.o_proj.outlier_index"], reordered.masked[layer].outliers[0])

        for linear, fused in (("mlp.down_proj", "mlp.down_proj"), ("self_attn.o_proj", "self_attn.o_proj")):
            hessian = reordered_hessian(stats, plan, prefix + linear)
            w = model.model.layers[layer].get_submodule(linear).weight.detach().numpy().astype(np.float64)

            def output_error(tensors):
                delta = w - dequantize(tensors, prefix + fused)
                return float(np.einsum("nk,kl,nl->", delta, hessian, delta))  # ||X (W - Wq)^T||^2

            assert output_error(gptq) < output_error(rtn), (layer, linear)


@pytest.mark.parametrize("case", ["empty-text", "too-few-tokens", "group-does-not-divide", "not-llama"])
def test_bad_input_stops_before_writing(case, smollm2_dir, tmp_path):
    out = tmp_path / "out"
    args = ["--model", smollm2_dir, "-o", out, "--group-size", "64", "--calib-window-length", "128"]
    if case == "empty-text":
        (tmp_path / "empty.txt").write_text("")
        args += ["--calib-text", tmp_path / "empty.txt"]
        needles = ["empty.txt"]
    elif case == "too-few-tokens":
        (tmp_path / "short.txt").write_text("Just a few words of text.")
        args += ["--calib-text", tmp_path / "short.txt"]
        needles = ["128"]
    elif case == "group-does-not-divide":
        args[args.index("64")] = "128"
        needles = ["576", "--group-size 64"]
    else:
        model = tmp_path / "model"
        model.mkdir()
        (model / "config.json").write_text(json.dumps({"model_type": "mistral"}))
        args[1] = model
        needles = ["mistral"]
    assert_user_error(run_module("atom_tvm.quantize", *args), *needles)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
