"""Packages built with Atom's quantized KV cache (``--kv-cache int4|fp16``) against transformers.

A random tiny Llama (2 layers, GQA 4/2, head_dim 64: the smallest shape the KV kernels take) is
built for llvm in float32 with a prefill chunk of 16 tokens, so a 37-token prompt runs as three
chunks whose attention reads the pages of the earlier ones, and 30 decode steps cross pages.

References, with teacher forcing (our greedy tokens fed to the reference in one pass, so the
two never diverge on a near-tie):
* int4: transformers with the quantizer's simulation of an INT4 KV cache
  (`simulate(preset("fp16", kv_bits=4))`: K after RoPE and V fake-quantized per token per head
  with the formats' rounding), fed q, K and V rounded to float16 as the cache's kernels take them.
  Without that rounding some codes land one step away (a float16 rounding moves a value across a
  grid boundary, or a row's span enough to change its float16 scale): measured 23% of the INT4
  cache's whole error. With it 4.8% remains, because the package rounds q and k to float16 before
  RoPE as well as after (the projection's output is float16) and the reference only after; the
  bound is 10%, while a cache quantizing any other way than the simulation lands near 100%.
* fp16: plain float32 transformers; the only difference is the float16 rounding of q, K and V.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from atom_tvm.build import build  # noqa: E402
from atom_tvm.quantization.simulate import preset, simulate  # noqa: E402
from atom_tvm.runtime.engine import ChatModel, LoadedPackage  # noqa: E402
from atom_tvm.runtime.kv_cache import AtomKVCache, KVCacheFull  # noqa: E402

PROMPT_LEN, STEPS, CHUNK = 37, 30, 16


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_tokenizer_dir):
    import shutil

    torch.manual_seed(5)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=384, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # random init gives near-uniform logits; sharpen them so tokens matter
        model.lm_head.weight.mul_(8.0)
    out = tmp_path_factory.mktemp("tiny-kv")
    model.save_pretrained(out)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def packages(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("kv-pkgs")
    out = {}
    for fmt in ("int4", "fp16"):
        out[fmt] = build(["--model", str(tiny_dir), "--target", "llvm", "--quantization", "fp32",
                          "--kv-cache", fmt, "--prefill-chunk-size", str(CHUNK), "--context-window-size", "128",
                          "-o", str(root / fmt), "--conv-template", "chatml"])
    return out


def run_package(chat: ChatModel, prompt: list[int]) -> tuple[np.ndarray, list[int]]:
    """Logits after the prompt and after each of STEPS greedy tokens: [STEPS, vocab]."""
    chat.reset()
    rows, tokens = [], []
    logits = chat.prefill(prompt)
    for _ in range(STEPS):
        row = logits.numpy().reshape(-1)
        rows.append(row)
        tokens.append(int(row.argmax()))
        logits = chat.decode(tokens[-1])
    return np.stack(rows), tokens


def _round_qkv_to_float16(model) -> None:
    """Route the model's attention through float16-rounded q, K and V (what the cache receives)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    inner_name = model.config._attn_implementation
    inner = ALL_ATTENTION_FUNCTIONS[inner_name]

    def attention(module, query, key, value, attention_mask, **kwargs):
        def r(x):
            return x.half().float()

        return inner(module, r(query), r(key), r(value), attention_mask, **kwargs)

    name = f"fp16-qkv-{inner_name}"
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner_name])
    model.set_attn_implementation(name)


def reference_model(model_dir, kv_bits: int | None, fp16_qkv: bool = False):
    """The float32 transformers model, its KV cache simulated at ``kv_bits`` (None: float), fed
    float16-rounded q, K and V with ``fp16_qkv`` (what the package's cache receives)."""
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    model.eval()
    if kv_bits is not None:
        simulate(model, preset("fp16", kv_bits=kv_bits), progress=False)
    if fp16_qkv:
        _round_qkv_to_float16(model)
    return model


def reference_logits(tiny_dir, kv_bits: int | None, ids: list[int], fp16_qkv: bool = False) -> np.ndarray:
    with torch.no_grad():
        return reference_model(tiny_dir, kv_bits, fp16_qkv)(torch.tensor([ids])).logits[0].double().numpy()


@pytest.mark.parametrize("fmt", ["int4", "fp16"])
def test_package_matches_reference_over_chunked_prefill_and_decode(tiny_dir, packages, fmt):
    prompt = np.random.default_rng(11).integers(0, 512, PROMPT_LEN).tolist()
    chat = ChatModel(packages[fmt], "cpu")
    assert chat.metadata["kv_cache"]["kind"] == "atom" and chat.metadata["kv_cache"]["format"] == fmt
    ours, tokens = run_package(chat, prompt)
    ids = prompt + tokens[:-1]
    steps = slice(PROMPT_LEN - 1, PROMPT_LEN - 1 + STEPS)
    float_ref = reference_logits(tiny_dir, None, ids)[steps]
    if fmt == "fp16":
        assert rel_l2(ours, float_ref) < 2e-3
        return
    sim = reference_logits(tiny_dir, 4, ids, fp16_qkv=True)[steps]
    int4_error = rel_l2(sim, float_ref)
    assert int4_error > 1e-2  # the INT4 cache does change the logits ...
    assert rel_l2(ours, sim) < 0.1 * int4_error  # ... the way the simulation says


def test_fork_shares_the_prefix_and_copies_the_partial_page(packages):
    """A forked sequence continues exactly like a fresh one with the same tokens, and the parent is
    not disturbed by the child's writes into its copy of the shared partial page."""
    pkg = LoadedPackage(packages["int4"], "cpu")
    prompt = np.random.default_rng(3).integers(0, 512, 21).tolist()  # 21 = one full page + 5

    def decode_step(kv, seq_ids, tokens):
        arg = kv.begin_forward(seq_ids, [1] * len(seq_ids))
        logits, _ = pkg.fns["batch_decode"](pkg.embed(tokens, rows=len(tokens)), arg, pkg.params)
        kv.end_forward()
        return logits.numpy().reshape(len(tokens), -1)

    def prefill(kv, seq_id, ids):
        arg = kv.begin_forward([seq_id], [len(ids)])
        pkg.fns["prefill"](pkg.embed(ids), arg, pkg.params)
        kv.end_forward()

    forked = pkg.open_kv_cache(max_batch=4, max_total_tokens=256)
    assert isinstance(forked, AtomKVCache)
    forked.add_sequence(0)
    prefill(forked, 0, prompt)
    used_before = forked.num_pages - forked.num_free_pages()
    forked.fork_sequence(0, 1)
    assert forked.num_pages - forked.num_free_pages() == used_before + 1  # only the partial page is copied
    together = [decode_step(forked, [0, 1], [7, 9]), decode_step(forked, [0, 1], [100, 200])]

    for seq, toks in ((0, (7, 100)), (1, (9, 200))):
        alone = pkg.open_kv_cache(max_batch=1, max_total_tokens=256)
        alone.add_sequence(5)
        prefill(alone, 5, prompt)
        for step, tok in enumerate(toks):
            np.testing.assert_allclose(decode_step(alone, [5], [tok])[0], together[step][seq], rtol=1e-5, atol=1e-5)

    forked.remove_sequence(1)
    forked.remove_sequence(0)
    assert forked.num_free_pages() == forked.num_pages


def test_a_step_that_does_not_fit_is_refused_before_anything_changes(packages):
    pkg = LoadedPackage(packages["int4"], "cpu")
    kv = pkg.open_kv_cache(max_batch=1, max_total_tokens=32)  # 2 pages + 1 spare
    kv.add_sequence(0)
    free = kv.num_free_pages()
    with pytest.raises(KVCacheFull, match="pages"):
        kv.begin_forward([0], [16 * (free + 1)])
    assert kv.num_free_pages() == free


def test_smollm2_int4_kv_perplexity_is_what_the_simulation_predicts(smollm2_dir, tmp_path):
    """The acceptance check on the real model: SmolLM2 (float32 weights) with the INT4 KV cache,
    perplexity on held-out Wikipedia text against the quantizer's simulation of an INT4 KV cache
    fed float16-rounded q, K and V as the package's cache is (see the module docstring), same
    windows: the package must pay the INT4 cache's cost (simulation over float, +12% here), and
    no more, to within a quarter of that cost.

    Why not a tighter bound: perplexity over 768 tokens of an INT4 cache moves by about 1-2% when
    K and V change by float rounding alone (codes flip at grid boundaries). Measured on SmolLM2
    (3 / 16 windows of 256 tokens): the float32-fed simulation lies 1.6-2.2% below the
    float16-fed one, and the package within -0.4% / +0.8% of the latter; the float32-fed
    simulation also differs between CPUs (a 1% bound against it passed on an AMD EPYC and failed
    on an Intel Xeon). A package that skipped the quantization (-11%) or broke it fails."""
    from cli import run_module

    from atom_tvm.datasets import WIKIPEDIA, held_out_windows
    from atom_tvm.eval import hf_window_logits, perplexity

    window, max_windows = 256, 3
    pkg = tmp_path / "smollm2-kv4"
    proc = run_module("atom_tvm.build", "--model", smollm2_dir, "--target", "llvm", "--quantization", "fp32",
                      "--kv-cache", "int4", "-o", pkg, "--context-window-size", str(window))
    assert proc.returncode == 0, proc.stderr
    results = {}
    for name, model in (("package", pkg), ("float", smollm2_dir)):
        out = tmp_path / f"{name}.json"
        proc = run_module("atom_tvm.eval", "ppl", "--model", model, "--window", str(window),
                          "--max-windows", str(max_windows), "--json", out)
        assert proc.returncode == 0, proc.stderr
        results[name] = json.loads(out.read_text())["ppl"]
    windows = held_out_windows(smollm2_dir, WIKIPEDIA, window, max_windows)
    model = reference_model(smollm2_dir, 4, fp16_qkv=True)
    results["simulation"] = perplexity(hf_window_logits(model), windows, progress=False)["ppl"]
    cost = results["simulation"] / results["float"] - 1
    assert cost > 0.02, results  # INT4 KV costs something on this model ...
    assert abs(results["package"] / results["simulation"] - 1) < cost / 4, results  # ... the package pays that
