"""`python -m atom_tvm.build`: input checks, the package layout, and CUDA builds on a GPU-less host."""

from __future__ import annotations

import json
import shutil

import pytest

from cli import assert_user_error, run_module

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir):
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    out = tmp_path_factory.mktemp("tiny-hf")
    transformers.LlamaForCausalLM(cfg).save_pretrained(out)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


def build(*args):
    return run_module("atom_tvm.build", *args)


def test_missing_model_dir(tmp_path):
    assert_user_error(build("--model", tmp_path / "nope", "--target", "llvm", "-o", tmp_path / "o"), "nope")
    assert not (tmp_path / "o").exists()


def test_non_llama_config_is_refused(tmp_path, tiny_model_dir):
    model = tmp_path / "gpt2"
    shutil.copytree(tiny_model_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    msg = assert_user_error(build("--model", model, "--target", "llvm", "-o", tmp_path / "o"), "gpt2", "llama")
    assert "config.json" in msg
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, needles", [
    (["--target", "rocm"], ["rocm", "llvm, cuda"]),
    (["--target", "cuda", "--arch", "sm_75"], ["sm_75", "sm_80, sm_86, sm_89, sm_90, sm_90a"]),
    (["--target", "cuda", "--arch", "sm80"], ["sm80", "sm_80"]),
    (["--target", "cuda"], ["--arch"]),
    (["--target", "cuda", "--arch", "sm_90a", "--quantization", "fp32"], ["fp32", "fp16"]),
    (["--target", "llvm", "--quantization", "int3"], ["int3", "fp32, fp16"]),
])
def test_bad_target_arch_or_quantization(tmp_path, tiny_model_dir, args, needles):
    assert_user_error(build("--model", tiny_model_dir, "-o", tmp_path / "o", *args), *needles)
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_force(tmp_path, tiny_model_dir):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep").write_text("x")
    assert_user_error(build("--model", tiny_model_dir, "--target", "llvm", "-o", out), "--force")
    assert (out / "keep").read_text() == "x"


def test_llvm_package_layout(tmp_path, tiny_model_dir):
    out = tmp_path / "pkg"
    proc = build("--model", tiny_model_dir, "--target", "llvm", "--quantization", "fp32", "-o", out,
                 "--conv-template", "chatml")
    assert proc.returncode == 0, proc.stderr
    assert [line.split("]")[0] for line in proc.stdout.splitlines()] == [f"[{i}/5" for i in range(1, 6)]
    names = {p.name for p in out.iterdir()}
    assert {"mlc-chat-config.json", "tensor-cache.json", "params_shard_0.bin", "model-llvm.so",
            "tokenizer.json"} <= names
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"]  # the temporary build dir was renamed away
    config = json.loads((out / "mlc-chat-config.json").read_text())
    assert config["model_config"]["hidden_size"] == 64 and config["conv_template"] == "chatml"

    from atom_tvm.runtime.engine import ChatModel

    chat = ChatModel(out, "cpu")
    for fn in ("embed", "prefill", "decode", "batch_prefill", "batch_decode", "create_paged_kv_cache",
               "get_logits", "softmax_with_temperature", "_metadata"):
        assert chat.model.vm[fn] is not None
    meta = chat.metadata
    assert meta["kv_cache"] == {"kind": "tvm", "num_hidden_layers": 1, "num_attention_heads": 4,
                                "num_key_value_heads": 2, "head_dim": 16, "dtype": "float32"}
    assert {p["name"] for p in meta["params"]} >= {"model.layers.0.self_attn.qkv_proj.weight", "lm_head.weight"}
    assert meta["memory_usage"]["prefill"] > 0

    # The runtime needs no TVM compiler: TVM_USE_RUNTIME_LIB=1 makes `import tvm` load the runtime only.
    proc = run_module("atom_tvm.chat", out, "--prompt", "w5 w6", "--temperature", "0", "--max-tokens", "4",
                      env={"TVM_USE_RUNTIME_LIB": "1"})
    assert proc.returncode == 0, proc.stderr


def test_cuda_build_on_a_gpu_less_host_carries_sass_for_exactly_the_requested_archs(tmp_path, tiny_model_dir):
    from atom_tvm.cuda_build import list_cuda_codes

    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed")
    out = tmp_path / "pkg"
    proc = build("--model", tiny_model_dir, "--target", "cuda", "--arch", "sm_80,sm_89,sm_90a",
                 "--quantization", "fp16", "-o", out)
    assert proc.returncode == 0, proc.stderr
    codes = list_cuda_codes(out / "model-cuda.so")
    assert codes["sass"] == ["sm_80", "sm_89", "sm_90a"]
    config = json.loads((out / "mlc-chat-config.json").read_text())
    assert config["target"] == "cuda" and config["arch"] == ["sm_80", "sm_89", "sm_90a"]


@pytest.mark.parametrize("tied", [False, True], ids=["lm_head", "tied-embeddings"])
def test_cuda_logits_come_from_our_fp16_gemm(tied):
    """On CUDA the vocabulary projection is `tir_kernels.dense_gemm`'s fp16 GEMM (TVM's matmul,
    scheduled by dlight, read a Llama-2-13B head at a fraction of memory speed); llvm builds keep
    TVM's matmul (their head is float32, see `atom_tvm.compile.export_model`)."""
    from pathlib import Path

    from atom_tvm.compile import export_model
    from atom_tvm.quantization.schemes import resolve
    from deploy.targets import make_target
    from relax_models.llama import LlamaConfig

    cfg = LlamaConfig.from_hf_dict({
        "model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": tied})
    scheme = resolve("fp16", Path("unused"), cfg)
    for target, ours in ((make_target("cuda", ["sm_90a"]), True), (make_target("llvm", []), False)):
        mod, _ = export_model(cfg, scheme, target)
        names = {gv.name_hint for gv in mod.get_global_vars()}
        assert ("fp16_gemm" in names) == ours, sorted(names)
