"""bench/e2e.py end to end on the CPU with a tiny Llama: library-only build, random weights, waves
through the engine, the HF baseline, the report. Proves the script works; its numbers mean nothing."""

from __future__ import annotations

import json

import pytest

from bench_scripts import load_bench_script

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
        "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
        "vocab_size": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 1024,
        "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def e2e():
    return load_bench_script("e2e")


def test_requests_follow_the_distribution(e2e):
    requests = e2e.draw_requests(4000, 512, seed=1, max_prompt=10**6, max_output=10**6)
    prompts = [len(p) for p, _ in requests]
    outputs = [o for _, o in requests]
    assert abs(sum(prompts) / len(prompts) / e2e.SHAREGPT_MEAN_PROMPT - 1) < 0.1
    assert abs(sum(outputs) / len(outputs) / e2e.SHAREGPT_MEAN_OUTPUT - 1) < 0.1
    assert all(0 <= t < 512 for p, _ in requests[:50] for t in p)
    capped = e2e.draw_requests(200, 512, seed=1, max_prompt=64, max_output=32)
    assert max(len(p) for p, _ in capped) == 64 and max(o for _, o in capped) == 32
    assert capped == e2e.draw_requests(200, 512, seed=1, max_prompt=64, max_output=32)


def test_build_run_report_on_cpu(e2e, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY))
    packages = tmp_path / "packages"
    assert e2e.main(["build", "-o", str(packages), "--target", "llvm", "--arch", "", "--variants", "atom-w4a4",
                     "--config", str(config), "--prefill-chunk-size", "64", "--context-window-size", "256"]) == 0
    assert not list(packages.glob("*/tensor-cache.json"))  # libraries only
    out = tmp_path / "e2e.json"
    # 2 MiB: the atom weights (1.8 MiB) leave room for a few requests' INT4 pages
    assert e2e.main(["run", "--packages", str(packages), "-o", str(out), "--device", "cpu",
                     "--systems", "atom-w4a4,hf-fp16", "--batch-sizes", "2,4", "--decode-steps", "3",
                     "--max-prompt", "40", "--max-output", "8", "--budget-gib", str(2 / 1024)]) == 0
    result = json.loads(out.read_text())
    points = {(p["system"], p["mode"], p["batch"]): p for p in result["points"]}
    for batch in (2, 4):
        for system in ("atom-w4a4", "hf-fp16"):
            p = points[(system, "unbounded", batch)]
            assert p["decode_steps"] == 3 and p["decode_tokens_per_s"] > 0
            assert p["decode_batch_mean"] <= batch
    # the budget's wave comes from the whole 256-request pool, past the largest batch size
    [budget] = [p for p in result["points"] if p["mode"].startswith("budget")]
    assert budget["batch"] > 4 and budget["requests"] == budget["batch"] and budget["decode_steps"] == 3
    assert budget["weights_gib"] + budget["kv_gib"] <= 2 / 1024
    png = tmp_path / "e2e.png"
    assert e2e.main(["report", str(out), "--png", str(png)]) == 0
    assert png.stat().st_size > 0


def test_unknown_variant_is_a_user_error(e2e, tmp_path, capsys):
    assert e2e.main(["build", "-o", str(tmp_path), "--variants", "fp8"]) == 2
    assert "--variants 'fp8'" in capsys.readouterr().err
