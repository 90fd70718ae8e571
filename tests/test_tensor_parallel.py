"""Tensor parallelism (`--tensor-parallel-shards`) on the CPU: the sharding itself, run shard by shard.

A CPU has no NCCL, so the N-shard package runs in a Disco `ThreadedSession` (one worker thread per
shard, atom-tvm's in-process all-reduce): the same library, per-shard weight files, page tables
and controller as on N GPUs, only the collective differs. Each sharded package is compared with the
one-shard build of the same weights on the same tokens:

* fp32 (float weights, Atom fp16 pages): logits within the rounding of the sums' new order (float32
  sums, float16 pages);
* atom-w4a4 from a checkpoint quantized for 2 shards (`quantize --tensor-parallel-shards 2`), against
  the one-shard build of that checkpoint (its o_proj and down_proj run as two blocks on one device):
  the same quantized model, and the same bits, since the blocks' partial products are summed in
  float32 where a few float16 terms add exactly in any order (`BlockedW4A4Linear`): identical logits
  and greedy tokens, on the CPU and on 2 GPUs through NCCL.

Plus the refusals: shard counts that do not divide the heads, KV heads or MLP; schemes without a
sharded build; a checkpoint laid out for another shard count; a missing shard file at load.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from cli import assert_user_error, run_module
from tiny_llama import calibration_text, rel_l2, save_tiny_llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from atom_tvm.build import build  # noqa: E402
from atom_tvm.runtime.engine import ChatModel, open_package  # noqa: E402

PROMPT_LEN, STEPS, CHUNK = 29, 12, 16
TINY_QUANT = ("--group-size", "64", "--n-outliers", "64", "--calib-windows", "4", "--calib-window-length", "128")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_tokenizer_dir):
    """A random Llama with 4 query heads, 2 KV heads and 384 MLP channels (2 shards split each)."""
    root = tmp_path_factory.mktemp("tiny-tp")
    return root, save_tiny_llama(root / "hf", tiny_tokenizer_dir, seed=3)


def build_pkg(model_dir, out, *extra, device: str = "cpu"):
    target = ["--target", "llvm"]
    if device == "cuda":  # for the GPUs of this host
        import tvm

        major, minor = tvm.cuda(0).compute_version.split(".")
        target = ["--target", "cuda", "--arch", "sm_90a" if (major, minor) == ("9", "0") else f"sm_{major}{minor}"]
    return build(["--model", str(model_dir), *target, "-o", str(out), "--prefill-chunk-size", str(CHUNK),
                  "--context-window-size", "128", "--conv-template", "chatml", *extra])


def greedy_logits(pkg_dir, prompt: list[int], forced: list[int] | None = None, device: str = "cpu"
                  ) -> tuple[np.ndarray, list[int]]:
    """Logits of a chunked prefill and STEPS greedy decode steps (feeding ``forced`` instead of the
    argmax when given, so two packages' steps see the same tokens)."""
    chat = ChatModel(pkg_dir, device)
    rows, tokens = [], []
    logits = chat.prefill(prompt)
    for step in range(STEPS):
        rows.append(logits.numpy().reshape(-1))
        tokens.append(int(rows[-1].argmax()))
        logits = chat.decode(forced[step] if forced else tokens[-1])
    if hasattr(chat.model, "close"):
        chat.model.close()
    return np.stack(rows), tokens


@pytest.fixture(scope="module")
def fp32_packages(tiny):
    """The tiny model in fp32 with Atom's fp16 pages: one shard, and two."""
    root, hf = tiny
    return (build_pkg(hf, root / "fp32-1", "--quantization", "fp32", "--kv-cache", "fp16"),
            build_pkg(hf, root / "fp32-2", "--quantization", "fp32", "--tensor-parallel-shards", "2"))


def test_fp32_two_shards_match_one(fp32_packages):
    one, two = fp32_packages
    config = json.loads((two / "mlc-chat-config.json").read_text())
    assert config["tensor_parallel_shards"] == 2 and config["kv_cache"] == "fp16"  # Atom's pages by default
    assert not (two / "tensor-cache.json").exists()
    shard_params = [json.loads((two / f"tp-shard-{k}" / "tensor-cache.json").read_text()) for k in range(2)]
    names = [{r["name"] for f in cache["records"] for r in f["records"]} for cache in shard_params]
    assert names[0] == names[1]
    prompt = np.random.default_rng(5).integers(3, 512, PROMPT_LEN).tolist()
    want, want_tokens = greedy_logits(one, prompt)
    got, got_tokens = greedy_logits(two, prompt)
    assert got_tokens == want_tokens
    # The shards sum o_proj's and down_proj's partial products in another order (float32 rounding),
    # and K/V go to float16 pages, where such a difference can flip a rounding (2^-11 relative):
    # measured 5.6e-5 of the largest logit.
    np.testing.assert_allclose(got, want, rtol=0, atol=2.5e-4 * np.abs(want).max())


@pytest.fixture(scope="module")
def atom_tp2_checkpoint(tiny):
    """The tiny model's Atom checkpoint laid out for 2 shards."""
    root, hf = tiny
    calib = calibration_text(root / "calib.txt")
    ckpt = root / "atom-tp2"
    proc = run_module("atom_tvm.quantize", "--model", hf, "-o", ckpt, "--calib-text", calib, *TINY_QUANT,
                      "--tensor-parallel-shards", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ckpt


def _gpu_count() -> int:
    import tvm

    from atom_tvm.runtime.engine import load_device

    load_device("cuda")
    return sum(1 for i in range(8) if tvm.cuda(i).exist)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_atom_w4a4_two_shards_match_one(tiny, atom_tp2_checkpoint, device, tmp_path):
    """On the CPU: a ThreadedSession. On a host with 2 GPUs: NCCL between two worker processes."""
    if device == "cuda" and _gpu_count() < 2:
        pytest.skip("needs 2 GPUs")
    _, hf = tiny
    ckpt = atom_tp2_checkpoint
    one = build_pkg(ckpt, tmp_path / "atom-1", "--quantization", "atom-w4a4", device=device)
    two = build_pkg(ckpt, tmp_path / "atom-2", "--quantization", "atom-w4a4", "--tensor-parallel-shards", "2",
                    device=device)
    prompt = np.random.default_rng(9).integers(3, 512, PROMPT_LEN).tolist()
    want, want_tokens = greedy_logits(one, prompt, device=device)
    got, got_tokens = greedy_logits(two, prompt, device=device)
    assert got_tokens == want_tokens
    np.testing.assert_array_equal(got, want)
    # And the model they both are is the quantized one, not something broken alike: nearer the float
    # model than a wiring error would leave it (the measure of tests/test_atom_w4a4_package.py).
    model = transformers.LlamaForCausalLM.from_pretrained(hf, torch_dtype=torch.float32)
    with torch.no_grad():
        float_logits = model(torch.tensor([prompt + want_tokens[:-1]])).logits[0].double().numpy()
    assert rel_l2(want, float_logits[PROMPT_LEN - 1:]) < 0.4


def test_shard_counts_that_do_not_divide_are_refused(tiny, tmp_path):
    _, hf = tiny
    proc = run_module("atom_tvm.build", "--model", hf, "--target", "llvm", "--quantization", "fp32",
                      "--tensor-parallel-shards", "3", "-o", tmp_path / "p")
    assert_user_error(proc, "--tensor-parallel-shards 3", "num_attention_heads 4", "[1, 2]")
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("args, needles", [
    (("--quantization", "w8a8", "--tensor-parallel-shards", "2"), ("w8a8", "no tensor-parallel build")),
    (("--quantization", "fp32", "--tensor-parallel-shards", "2", "--kv-cache", "tvm"), ("--kv-cache fp16",)),
])
def test_unsupported_combinations_are_refused(tiny, tmp_path, args, needles):
    _, hf = tiny
    proc = run_module("atom_tvm.build", "--model", hf, "--target", "llvm", *args, "-o", tmp_path / "p")
    assert_user_error(proc, *needles)


def test_atom_checkpoint_for_one_shard_is_refused_for_two(tiny, tmp_path):
    _, hf = tiny
    calib = calibration_text(tmp_path / "calib.txt", seed=1, words=1500)
    ckpt = tmp_path / "atom-tp1"
    proc = run_module("atom_tvm.quantize", "--model", hf, "-o", ckpt, "--calib-text", calib, "--no-gptq",
                      *TINY_QUANT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_module("atom_tvm.build", "--model", ckpt, "--target", "llvm", "--quantization", "atom-w4a4",
                      "--tensor-parallel-shards", "2", "-o", tmp_path / "p")
    assert_user_error(proc, "laid out for 1 shard", "--tensor-parallel-shards 2")


def test_missing_shard_file_names_the_shard(fp32_packages, tmp_path):
    pkg = tmp_path / "pkg"
    shutil.copytree(fp32_packages[1], pkg)
    (pkg / "tp-shard-1" / "params_shard_0.bin").unlink()
    with pytest.raises(Exception) as err:
        open_package(pkg, "cpu")
    assert "tensor-parallel shard 1 of 2" in str(err.value) and "params_shard_0.bin" in str(err.value)
    proc = run_module("atom_tvm.chat", pkg, "--device", "cpu", stdin="/exit\n")
    assert_user_error(proc, "tensor-parallel shard 1 of 2")


def test_blocked_outlier_permutation_reorders_each_shard_slice_alone():
    from atom_tvm.quantization.reorder import blocked_outlier_permutation

    rng = np.random.default_rng(4)
    k, blocks, outliers = 48, 3, 5
    sumsq = rng.random(k)
    perm = blocked_outlier_permutation(sumsq, outliers, blocks)
    width = k // blocks
    for b in range(blocks):
        block = perm[b * width:(b + 1) * width]
        channels = np.arange(b * width, (b + 1) * width)
        assert sorted(block) == channels.tolist()  # a slice stays on its shard
        top = set(channels[np.argsort(sumsq[channels])[-outliers:]])
        assert set(block[-outliers:]) == top  # its own largest channels last
        normal = block[:-outliers]
        assert normal.tolist() == sorted(normal)  # the rest in their order


def test_engine_and_server_run_a_sharded_package(atom_tp2_checkpoint, tmp_path):
    """Continuous batching over a sharded package gives, request by request, the tokens of the
    one-shard package (bit-identical builds, see above); the server answers from one."""
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    from atom_tvm.runtime.batching import Engine, SamplingParams
    from cli import REPO

    one = build_pkg(atom_tp2_checkpoint, tmp_path / "atom-1", "--quantization", "atom-w4a4")
    two = build_pkg(atom_tp2_checkpoint, tmp_path / "atom-2", "--quantization", "atom-w4a4",
                    "--tensor-parallel-shards", "2")
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, 512, int(n)).tolist() for n in rng.integers(3, 40, 6)]
    outputs = []
    for pkg_dir in (one, two):
        engine = Engine(open_package(pkg_dir, "cpu"), max_batch=4, kv_tokens=512)
        outputs.append([c.token_ids for c in engine.generate(prompts, SamplingParams(temperature=0, max_tokens=10))])
    assert outputs[0] == outputs[1] and all(len(t) == 10 for t in outputs[1])

    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "atom_tvm.serve", str(two), "--port", "0", "--kv-budget", "1024",
                                 "--max-batch", "8"],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline, url = time.monotonic() + 120, None
        while url is None:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            url = next((line.split(" on ")[1].split()[0] for line in log.read_text().splitlines()
                        if " on http://" in line), None)
            time.sleep(0.2)
        body = json.dumps({"prompt": prompts[0], "max_tokens": 10, "temperature": 0}).encode()
        request = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())
        assert answer["usage"]["completion_tokens"] == 10 and answer["choices"][0]["finish_reason"] == "length"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
