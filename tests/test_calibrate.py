"""atom_tvm.quantization.calibrate: per-site sums of squares and Hessians, the .npz file, the CLI.

Also home of `tiny_llama`, the random Llama the quantization tests share.
"""

from __future__ import annotations

import numpy as np
import pytest

from atom_tvm.errors import UserError
from cli import assert_user_error, run_module

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from atom_tvm.quantization.calibrate import CalibrationStats, collect_stats, decoder_linears  # noqa: E402


def tiny_llama(seed: int = 0, **overrides):
    """A random 2-layer Llama whose widths fit Atom's layout (192 = 64 outliers + 2 groups of 64,
    320 = 64 + 4 x 64), with a few loud channels per norm so outliers exist, as in trained models."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**{**dict(
        vocab_size=512, hidden_size=192, intermediate_size=320, num_hidden_layers=2, num_attention_heads=3,
        num_key_value_heads=1, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False), **overrides})
    model = transformers.LlamaForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.mul_(2.0)
            elif name.endswith("layernorm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
                p[torch.randperm(p.numel(), generator=gen)[:8]] *= 20.0
    return model


def random_windows(n: int, length: int, seed: int = 0, vocab: int = 512) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, (n, length))


def linear_inputs(model, windows: np.ndarray) -> dict[str, np.ndarray]:
    """Every decoder Linear's inputs over ``windows``, [tokens, K] float64, captured independently."""
    seen: dict[str, list] = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: seen.setdefault(name, []).append(
        args[0].detach().reshape(-1, args[0].shape[-1]).double())) for name, m in decoder_linears(model).items()]
    with torch.no_grad():
        for w in windows:
            model(input_ids=torch.as_tensor(w[None]))
    for h in handles:
        h.remove()
    return {name: torch.cat(xs).numpy() for name, xs in seen.items()}


def test_stats_are_sums_of_squares_and_hessians_per_site():
    model, windows = tiny_llama(), random_windows(3, 24)
    stats = collect_stats(model, windows, hessian=True)
    inputs = linear_inputs(model, windows)
    assert stats.n_tokens == 72
    assert len(stats.sites) == 14 and len(stats.sumsq) == len(stats.hessian) == 8  # 4 sites x 2 layers
    for i in range(2):
        p = f"model.layers.{i}."
        assert {stats.sites[p + s] for s in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")} == \
            {p + "self_attn.q_proj"}
        assert stats.sites[p + "mlp.up_proj"] == p + "mlp.gate_proj"
    for name, x in inputs.items():
        np.testing.assert_allclose(stats.sumsq_for(name), (x * x).sum(0), rtol=1e-12)
        np.testing.assert_allclose(stats.hessian_for(name), x.T @ x, rtol=1e-10, atol=1e-10)
        assert stats.sumsq_for(name).dtype == np.float64


def test_npz_round_trip_and_lookups(tmp_path):
    stats = collect_stats(tiny_llama(), random_windows(1, 16))
    stats.info = {"model": "tiny"}
    stats.save(tmp_path / "s.npz")
    loaded = CalibrationStats.load(tmp_path / "s.npz")
    assert loaded.sites == stats.sites and loaded.n_tokens == 16 and loaded.info == {"model": "tiny"}
    assert loaded.sumsq.keys() == stats.sumsq.keys() and not loaded.hessian
    for k, v in stats.sumsq.items():
        assert np.array_equal(loaded.sumsq[k], v)
    with pytest.raises(UserError, match="--hessian"):
        loaded.hessian_for("model.layers.0.self_attn.q_proj")
    with pytest.raises(UserError, match="nothing for model.layers.7"):
        loaded.sumsq_for("model.layers.7.mlp.down_proj")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a calibration statistics file"):
        CalibrationStats.load(tmp_path / "bad.npz")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir):
    out = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(out)
    for f in tiny_tokenizer_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


def test_cli_collects_and_saves(tmp_path, tiny_model_dir):
    text = tmp_path / "words.txt"
    text.write_text(" ".join(f"w{i % 509 + 3}" for i in range(100)))
    out = tmp_path / "stats.npz"
    proc = run_module("atom_tvm.quantization.calibrate", "--model", tiny_model_dir, "--text", text,
                      "--windows", 2, "--window-length", 32, "--hessian", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "1/2 windows" in proc.stderr and "2/2 windows" in proc.stderr  # the progress line
    stats = CalibrationStats.load(out)
    assert stats.n_tokens == 64 and len(stats.hessian) == 8
    assert stats.info["windows"] == 2 and stats.info["window_length"] == 32


def test_cli_errors_write_nothing(tmp_path, tiny_model_dir):
    text = tmp_path / "short.txt"
    text.write_text("w3 w4 w5")
    out = tmp_path / "stats.npz"
    assert_user_error(run_module("atom_tvm.quantization.calibrate", "--model", tiny_model_dir, "--text", text,
                                 "--windows", 2, "--window-length", 32, "-o", out), "3 tokens", "window of 32")
    assert_user_error(run_module("atom_tvm.quantization.calibrate", "--model", tmp_path / "nope", "--text", text,
                                 "--window-length", 2, "-o", out), "nope")
    assert list(tmp_path.iterdir()) == [text]
