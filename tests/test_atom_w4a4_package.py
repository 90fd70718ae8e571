"""atom-w4a4 packages built from Atom checkpoints, on the CPU, against the quantizer's torch simulation.

1. A random tiny Llama (2 layers, hidden 256, GQA 4/2, head_dim 64, norm weights drawn away from 1 so
   their reorder matters), quantized by `python -m atom_tvm.quantize` (G = 64, 64 outliers, GPTQ; with
   atom-tvm's default layouts, shared residual order and masked o_proj outliers, and with the paper's,
   per-layer and gathered) and
   built with `python -m atom_tvm.build --quantization atom-w4a4` (INT4 KV implied). Its logits over a
   chunked prefill and 30 greedy decode steps (teacher-forced into the references) are compared with
   `simulate(preset("atom-w4a4", ...))` on the same calibration.

   Tolerance: the package runs in float16 and the simulation in float32, and W4A4 amplifies that
   difference: an activation that float16 moves across a rounding boundary changes its INT4 code by a
   whole step. The measure of how much that alone moves the logits is the same simulation run in
   float16 (`model.half()`): the package must be no farther from the float32 simulation than 1.5x
   that distance, and below 0.75x the float model's own distance from it (measured before the layout
   options existed: package 0.131, float16 simulation 0.134, float model 0.259, in relative L2 of the
   logits). A wiring error is far
   outside: with the checkpoint's permuted norm weights handed to the kernel as they are (which
   scales each channel by another channel's weight) the package lands at 0.535.

2. The real SmolLM2 (G = 64 for its 576 channels; a reduced calibration of 2 x 128 tokens and
   round-to-nearest weights, the RTN checkpoint being bit-identical to the simulation's weights per
   tests/test_quantize.py): perplexity of the CPU package on 4 x 256 held-out Wikipedia tokens against
   the simulation's on the same windows, and a coherent greedy chat answer.

   The issue's target is 1% of the simulation; docs/bench/atom_w4a4_smollm2.md has the full-size
   numbers (GPTQ, 8 x 512 tokens: CPU -0.13%, H200 -1.09%). On these reduced windows float16 alone
   moves the simulation's perplexity by 3.2% (the same simulation run in float16; measured 25.61 ->
   26.44) and the package lands at 26.97 (+5.3%), so the bound here is 1% plus twice the float16
   simulation's own distance, measured in the test (test 1 shows how far a wiring error moves the
   logits of the tiny model).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from cli import run_module
from tiny_llama import calibration_text, rel_l2, save_tiny_llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from atom_tvm.build import build  # noqa: E402
from atom_tvm.runtime.engine import ChatModel  # noqa: E402

PROMPT_LEN, STEPS, CHUNK = 37, 30, 16
TINY_QUANT = ("--group-size", "64", "--n-outliers", "64", "--calib-windows", "4", "--calib-window-length", "128")


@pytest.fixture(scope="module", params=[("shared", "masked"), ("per-layer", "gathered")], ids="-".join)
def tiny(request, tmp_path_factory, tiny_tokenizer_dir):
    """(HF dir, calibration text, Atom checkpoint, package), for atom-tvm's default residual order and
    o_proj outlier layout, and for Atom's paper's."""
    root = tmp_path_factory.mktemp("tiny-atom")
    hf = save_tiny_llama(root / "hf", tiny_tokenizer_dir, seed=7, vary_norms=True)
    calib = calibration_text(root / "calib.txt")
    ckpt = root / "atom"
    residual_order, o_proj_outliers = request.param
    proc = run_module("atom_tvm.quantize", "--model", hf, "-o", ckpt, "--calib-text", calib, *TINY_QUANT,
                      "--residual-order", residual_order, "--o-proj-outliers", o_proj_outliers)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pkg = build(["--model", str(ckpt), "--target", "llvm", "--quantization", "atom-w4a4", "-o", str(root / "pkg"),
                 "--prefill-chunk-size", str(CHUNK), "--context-window-size", "128", "--conv-template", "chatml"])
    return hf, calib, ckpt, pkg


def checkpoint_layouts(ckpt) -> dict:
    """The residual order and o_proj outlier layout an Atom checkpoint was quantized with."""
    config = json.loads((ckpt / "atom_quant_config.json").read_text())["config"]
    return {key: config[key] for key in ("residual_order", "o_proj_outliers")}


def simulated_logits(hf, calib, ids: list[int], half: bool, layouts: dict) -> np.ndarray:
    from atom_tvm.quantization.calibrate import calibrate, load_float_model
    from atom_tvm.quantization.simulate import preset, simulate

    model = load_float_model(hf, "cpu")
    stats = calibrate(hf, str(calib), "train", 4, 128, hessian=True, model=model)
    simulate(model, preset("atom-w4a4", group_size=64, n_outliers=64, **layouts), stats, progress=False)
    if half:
        model = model.half()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def package_logits(pkg, device: str = "cpu", forced: list[int] | None = None) -> tuple[np.ndarray, list[int]]:
    """Logits of the prompt's chunked prefill and STEPS greedy decode steps (feeding ``forced``
    instead of the argmax when given), and the tokens fed."""
    chat = ChatModel(pkg, device)
    prompt = np.random.default_rng(11).integers(3, 512, PROMPT_LEN).tolist()
    rows, tokens = [], []
    logits = chat.prefill(prompt)
    for step in range(STEPS):
        rows.append(logits.numpy().reshape(-1))
        tokens.append(forced[step] if forced else int(rows[-1].argmax()))
        logits = chat.decode(tokens[-1])
    return np.stack(rows), prompt + tokens


def assert_near_the_simulation(hf, calib, ids, logits, layouts: dict) -> None:
    """``logits`` (of the steps after the prompt) are as near the float32 simulation as float16
    alone moves it, and much nearer than the float model (see the module docstring)."""
    steps = slice(PROMPT_LEN - 1, PROMPT_LEN - 1 + STEPS)
    sim = simulated_logits(hf, calib, ids, False, layouts)[steps]
    sim_half = simulated_logits(hf, calib, ids, True, layouts)[steps]
    model = transformers.LlamaForCausalLM.from_pretrained(hf, torch_dtype=torch.float32)
    with torch.no_grad():
        float_logits = model(torch.tensor([ids])).logits[0].double().numpy()[steps]
    half_spread, quant_error = rel_l2(sim_half, sim), rel_l2(float_logits, sim)
    distance = rel_l2(logits, sim)
    assert distance < 1.5 * half_spread, (distance, half_spread)
    assert distance < 0.75 * quant_error, (distance, quant_error)


def test_tiny_package_matches_the_simulation(tiny):
    hf, calib, ckpt, pkg = tiny
    config = json.loads((pkg / "mlc-chat-config.json").read_text())
    assert config["quantization"] == "atom-w4a4"
    layouts = checkpoint_layouts(ckpt)
    assert layouts.items() <= config["quantization_config"].items()
    assert {"name": "atom-w4a4", "group_size": 64, "n_outliers": 64, "kv_cache": "int4",
            "activation_clip": 0.9}.items() <= config["quantization_config"].items()
    chat = ChatModel(pkg, "cpu")
    assert chat.metadata["kv_cache"]["format"] == "int4" and chat.metadata["kv_cache"]["dtype"] == "float16"
    params = {p["name"]: p["dtype"] for p in chat.metadata["params"]}
    assert params["model.layers.1.mlp.down_proj.q4"] == "uint8" and params["model.layers.0.self_attn.o_proj.q8"] == "int8"

    ours, ids = package_logits(pkg)
    if layouts["o_proj_outliers"] == "masked":  # o_proj multiplies its 64 outliers twice: in place, zeroed, and copied
        assert params["model.layers.0.self_attn.o_proj.outlier_mask"] == "uint8"
        assert chat.metadata["params"][[p["name"] for p in chat.metadata["params"]].index(
            "model.layers.0.self_attn.o_proj.s4")]["shape"] == [256, 256 // 64]
    assert_near_the_simulation(hf, calib, ids[:-1], ours, layouts)


@pytest.mark.gpu
def test_tiny_package_on_the_gpu_matches_the_simulation(tiny, tmp_path):
    """The CUDA build for this host's GPU, fed the CPU package's greedy tokens, within the same
    bounds of the simulation as the CPU package (test 1)."""
    from atom_tvm.runtime.engine import load_device

    hf, calib, ckpt, pkg = tiny
    major, minor = load_device("cuda").compute_version.split(".")
    arch = "sm_90a" if (major, minor) == ("9", "0") else f"sm_{major}{minor}"
    gpu_pkg = build(["--model", str(ckpt), "--target", "cuda", "--arch", arch, "--quantization", "atom-w4a4",
                     "-o", str(tmp_path / "pkg"), "--prefill-chunk-size", str(CHUNK), "--context-window-size", "128",
                     "--conv-template", "chatml"])
    _, ids = package_logits(pkg)
    ours, _ = package_logits(gpu_pkg, "cuda", forced=ids[PROMPT_LEN:])
    assert np.isfinite(ours).all()
    assert_near_the_simulation(hf, calib, ids[:-1], ours, checkpoint_layouts(ckpt))


@pytest.mark.parametrize("archs", ["sm_90a", "sm_80,sm_89,sm_90a"])
def test_tiny_package_builds_for_cuda(tiny, tmp_path, archs):
    """The whole atom-w4a4 model in one nvcc module: on sm_90a alone the wgmma W4A4 GEMM, the
    INT4 tensor-core decode attention and the quantizers all take dynamic shared memory, whose
    `extern __shared__` arrays share one namespace in the module (two of the same name and
    different types stopped nvcc once)."""
    from atom_tvm.cuda_build import list_cuda_codes

    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed")
    _, _, ckpt, _ = tiny
    out = tmp_path / "pkg"
    build(["--model", str(ckpt), "--target", "cuda", "--arch", archs, "--quantization", "atom-w4a4",
           "-o", str(out), "--context-window-size", "128"])
    assert list_cuda_codes(out / "model-cuda.so")["sass"] == archs.split(",")


# --- SmolLM2 ---------------------------------------------------------------------------------------

SMOL_CALIB = ("--calib-windows", "2", "--calib-window-length", "128")
PPL_WINDOWS, PPL_WINDOW = 4, 256


@pytest.fixture(scope="module")
def smollm2_atom(smollm2_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2-atom")
    proc = run_module("atom_tvm.quantize", "--model", smollm2_dir, "-o", root / "ckpt", "--group-size", "64",
                      "--no-gptq", *SMOL_CALIB)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_module("atom_tvm.build", "--model", root / "ckpt", "--target", "llvm", "--quantization", "atom-w4a4",
                      "-o", root / "pkg", "--context-window-size", "1024")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "pkg"


def test_smollm2_package_perplexity_against_the_simulation(smollm2_dir, smollm2_atom, tmp_path):
    """The package through `python -m atom_tvm.eval ppl`; the simulation through the same command's
    functions (the CLI has no switch for round-to-nearest weights), on the same windows, in float32 and,
    as the measure of what float16 alone does to a W4A4 model, in float16."""
    from atom_tvm.datasets import WIKIPEDIA, held_out_windows
    from atom_tvm.eval import hf_window_logits, perplexity
    from atom_tvm.quantization.calibrate import calibrate, load_float_model
    from atom_tvm.quantization.simulate import preset, simulate

    out = tmp_path / "package.json"
    proc = run_module("atom_tvm.eval", "ppl", "--model", smollm2_atom, "--window", PPL_WINDOW,
                      "--max-windows", PPL_WINDOWS, "--json", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    package = json.loads(out.read_text())
    assert package["kv_cache"] == "int4" and package["quantization"] == "atom-w4a4"

    model = load_float_model(smollm2_dir, "cpu")
    stats = calibrate(smollm2_dir, WIKIPEDIA, "train", 2, 128, hessian=False, model=model)
    simulate(model, preset("atom-w4a4", group_size=64, gptq=False), stats, progress=False)
    windows = held_out_windows(smollm2_dir, WIKIPEDIA, PPL_WINDOW, PPL_WINDOWS)
    simulation = perplexity(hf_window_logits(model), windows, progress=False)["ppl"]
    half_simulation = perplexity(hf_window_logits(model.half()), windows, progress=False)["ppl"]
    float16_effect = abs(half_simulation / simulation - 1)
    assert abs(package["ppl"] / simulation - 1) < 0.01 + 2 * float16_effect, (package["ppl"], simulation,
                                                                               half_simulation)


def test_smollm2_package_answers_coherently(smollm2_atom):
    proc = run_module("atom_tvm.chat", smollm2_atom, "--prompt", "What is the capital of France?",
                      "--temperature", "0", "--max-tokens", "24")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Paris" in proc.stdout, proc.stdout
