"""Shared fixtures and the `gpu` marker's skip rule."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest


def _has_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="no NVIDIA GPU on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """A word-level tokenizer with 512 entries (<unk>, <s>, </s>, w3..w511) for random tiny models."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 512)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    out = tmp_path_factory.mktemp("tiny-tokenizer")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return out


@pytest.fixture(scope="session")
def smollm2_conversion(tmp_path_factory):
    """The bundled SmolLM2 GGUF converted once per session through the CLI: (directory, process)."""
    from cli import run_module

    out = tmp_path_factory.mktemp("convert") / "SmolLM2-135M-Instruct"
    proc = run_module("atom_tvm.convert_gguf", "-o", out)
    assert proc.returncode == 0, proc.stderr
    return out, proc


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_conversion):
    return smollm2_conversion[0]


@pytest.fixture(scope="session")
def smollm2_fp32_package(smollm2_dir, tmp_path_factory):
    """SmolLM2 built for the CPU in float32 through the build CLI."""
    from cli import run_module

    out = tmp_path_factory.mktemp("dist") / "smollm2-fp32-llvm"
    proc = run_module("atom_tvm.build", "--model", smollm2_dir, "--target", "llvm", "--quantization", "fp32",
                      "-o", out, "--context-window-size", "2048")
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="session")
def cuda_toolchain():
    """CUDA builds on this host: skipped only where nvcc or cuobjdump is genuinely absent."""
    from atom_tvm import cuda_build

    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed (CUDA toolkit needed to build --target cuda)")
    if cuda_build.find_cuobjdump() is None:
        pytest.skip("cuobjdump not installed (pip install nvidia-cuda-cuobjdump)")
    return cuda_build.enable_cuda_codegen()
