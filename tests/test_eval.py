"""atom_tvm.eval: perplexity of transformers models (float and simulated) and of compiled packages.

SmolLM2's perplexity through transformers and through our compiled fp32 CPU package must agree
(1e-3 relative) on the same windows, and simulated presets must rank sensibly. Windows are small
(2 x 64 tokens) to keep CI fast on two cores.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from atom_tvm.eval import main, package_window_logits, perplexity, window_nll
from cli import assert_user_error, run_module

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

WINDOWS = ["--text", "wikipedia", "--window", "64", "--max-windows", "2"]


def test_window_nll_is_cross_entropy():
    rng = np.random.default_rng(0)
    logits, ids = rng.standard_normal((9, 50)).astype(np.float32) * 5, rng.integers(0, 50, 9)
    expected = torch.nn.functional.cross_entropy(torch.from_numpy(logits[:-1]).double(), torch.from_numpy(ids[1:]),
                                                 reduction="sum")
    assert window_nll(logits, ids) == pytest.approx(float(expected), rel=1e-12)
    windows = np.stack([ids, ids[::-1]])
    result = perplexity(lambda w: logits, windows, progress=False)
    assert result["tokens"] == 16 and result["windows"] == 2
    assert result["ppl"] == pytest.approx(np.exp((window_nll(logits, ids) + window_nll(logits, ids[::-1])) / 16))


def run_main(capsys, *argv) -> tuple[int, str, str]:
    code = main(["ppl", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_package_perplexity_matches_transformers(smollm2_dir, smollm2_fp32_package, tmp_path, capsys):
    reports = {}
    for kind, model in (("hf", smollm2_dir), ("package", smollm2_fp32_package)):
        code, out, err = run_main(capsys, "--model", model, *WINDOWS, "--json", tmp_path / f"{kind}.json")
        assert code == 0, err
        assert out.startswith("ppl ") and "2/2 windows" in err
        reports[kind] = json.loads((tmp_path / f"{kind}.json").read_text())
    hf, pkg = reports["hf"], reports["package"]
    assert (hf["kind"], hf["quantization"], pkg["kind"], pkg["quantization"]) == ("hf", "fp16", "package", "fp32")
    assert hf["tokens"] == pkg["tokens"] == 2 * 63
    assert abs(pkg["ppl"] - hf["ppl"]) / hf["ppl"] < 1e-3
    assert 5 < hf["ppl"] < 60  # a trained model on English prose


def test_package_logits_in_prefill_chunks(smollm2_fp32_package):
    """Windows longer than the prefill chunk go in pieces that attend to the cached earlier ones."""
    from atom_tvm.runtime.engine import ChatModel

    chat = ChatModel(smollm2_fp32_package, "cpu")
    ids = np.arange(1000, 1040)
    whole = package_window_logits(chat)(ids)
    chat.prefill_chunk_size = 16
    chunked = package_window_logits(chat)(ids)
    assert whole.shape == chunked.shape == (40, chat.config["model_config"]["vocab_size"])
    assert np.abs(chunked - whole).max() < 1e-3 * np.abs(whole).max()


def test_simulated_presets_rank_sensibly(smollm2_dir, tmp_path, capsys):
    from atom_tvm.datasets import held_out_windows
    from atom_tvm.eval import hf_window_logits
    from atom_tvm.quantization.calibrate import load_float_model
    from atom_tvm.quantization.simulate import preset, simulate

    windows = held_out_windows(smollm2_dir, "wikipedia", 64, 2)
    ppl = {}
    for name in ("fp16", "w8a8", "w4a4-rtn"):  # presets without calibration
        model = simulate(load_float_model(smollm2_dir), preset(name), progress=False)
        ppl[name] = perplexity(hf_window_logits(model), windows, progress=False)["ppl"]
    # Atom presets through the CLI: they calibrate on the train split and evaluate on the test split.
    # SmolLM2's 576 channels - 128 outliers = 448 need groups of 64.
    for name, extra in (("+outliers-int8", []), ("+clip", ["--group-size", 64])):
        code, out, err = run_main(capsys, "--model", smollm2_dir, "--quantization", name, *extra, *WINDOWS,
                                  "--calib-windows", 1, "--calib-window-length", 128, "--json", tmp_path / "atom.json")
        assert code == 0, err
        report = json.loads((tmp_path / "atom.json").read_text())
        assert report["calibration"]["split"] == "train" and report["calibration"]["window_length"] == 128
        ppl[name] = report["ppl"]
    atom = [ppl["+outliers-int8"], ppl["+clip"]]
    # W8A8 is near-lossless: over these 128 tokens the sign of its difference from fp16 is noise
    # (+ on an AMD EPYC, -0.5% on an Intel Xeon), so it is held to within 3% of fp16, not above it.
    assert abs(ppl["w8a8"] / ppl["fp16"] - 1) < 0.03, ppl
    assert max(ppl["fp16"], ppl["w8a8"]) < min(atom) and max(atom) < ppl["w4a4-rtn"], ppl
def test_cli_errors(tmp_path, smollm2_dir, smollm2_fp32_package):
    text = tmp_path / "t.txt"
    text.write_text("Some words, but not many.")

    def ppl(*argv):
        return run_module("atom_tvm.eval", "ppl", *argv)

    assert_user_error(ppl("--model", tmp_path / "none", "--text", text), "no such model directory")
    assert_user_error(ppl("--model", smollm2_fp32_package, "--text", tmp_path / "x.txt"), "x.txt", "no such file")
    assert_user_error(ppl("--model", smollm2_fp32_package, "--text", text), "fewer than one window")
    assert_user_error(ppl("--model", smollm2_fp32_package, "--text", "wikipedia", "--quantization", "atom-w4a4"),
                      "built with --quantization fp32")
    assert_user_error(ppl("--model", smollm2_dir, "--text", "wikipedia", "--quantization", "w3a3"), "choose one of")
    # A lone file has no disjoint calibration text; the error names the way out.
    assert_user_error(ppl("--model", smollm2_dir, "--text", text, "--window", 4, "--quantization", "+group"),
                      "--calib-text")
