"""atom_tvm.quantization.reorder: outliers moved last, folded where possible, the rest as runtime indices.

The reordered model with its runtime indices applied must compute what the original computes (fp32,
1e-5), on a random tiny Llama and on SmolLM2's first layers with their real weights and real
calibration statistics; the channels moved last must be the top-K by sum of squares.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from atom_tvm.errors import UserError
from atom_tvm.quantization.reorder import (RUNTIME_SITES, SITE_LINEARS, attach_runtime_indices,
                                           outlier_permutation, plan_reorder, reorder_model)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from atom_tvm.quantization.calibrate import collect_stats  # noqa: E402
from test_calibrate import random_windows, tiny_llama  # noqa: E402


def test_outlier_permutation():
    sumsq = np.array([5.0, 1.0, 9.0, 1.0, 7.0, 0.5])
    assert outlier_permutation(sumsq, 2).tolist() == [0, 1, 3, 5, 2, 4]  # rest in order, outliers ascending
    assert outlier_permutation(sumsq, 0).tolist() == list(range(6))
    assert outlier_permutation(np.ones(4), 1).tolist() == [1, 2, 3, 0]  # ties: lowest channel wins
    with pytest.raises(UserError, match="between 0 and 6"):
        outlier_permutation(sumsq, 7)


def rel_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def check_reorder_is_exact(model, stats, ids: np.ndarray, n_outliers: int) -> None:
    x = torch.as_tensor(ids)
    with torch.no_grad():
        ref = model(x).logits
    plan = plan_reorder(stats, len(model.model.layers), n_outliers)
    reordered, indices = reorder_model(copy.deepcopy(model), stats, n_outliers)
    assert reordered.__class__ is model.__class__
    assert {tuple(sites) for sites in indices.values()} == {RUNTIME_SITES}  # down_proj's input is folded
    with torch.no_grad():
        assert rel_err(reordered(x).logits, ref) > 1e-2  # without its runtime indices it is another model
        attach_runtime_indices(reordered, indices)
        assert rel_err(reordered(x).logits, ref) < 1e-5

    for i, perms in plan.items():
        for site, linear in SITE_LINEARS.items():
            sumsq, perm = stats.sumsq_for(f"model.layers.{i}.{linear}"), perms[site]
            assert sorted(perm) == list(range(len(sumsq)))
            top = set(np.argsort(sumsq)[-n_outliers:])
            assert set(perm[-n_outliers:]) == top
            assert np.all(np.diff(perm[:-n_outliers]) > 0)  # the ordinary channels keep their order
            if site in indices[i]:
                assert np.array_equal(indices[i][site], perm)
    # Folded weights: consumer columns and norm weights follow their site, gate/up rows follow down_in.
    layer, orig, p = reordered.model.layers[0], model.model.layers[0], plan[0]
    assert torch.equal(layer.self_attn.q_proj.weight, orig.self_attn.q_proj.weight[:, p["attn_in"]])
    assert torch.equal(layer.input_layernorm.weight, orig.input_layernorm.weight[p["attn_in"]])
    assert torch.equal(layer.self_attn.o_proj.weight, orig.self_attn.o_proj.weight[:, p["o_in"]])
    assert torch.equal(layer.mlp.up_proj.weight, orig.mlp.up_proj.weight[p["down_in"]][:, p["mlp_in"]])
    assert torch.equal(layer.mlp.down_proj.weight, orig.mlp.down_proj.weight[:, p["down_in"]])


def test_tiny_llama_reorder_is_exact():
    model = tiny_llama(seed=3)
    stats = collect_stats(model, random_windows(2, 32))
    check_reorder_is_exact(model, stats, random_windows(2, 40, seed=1), n_outliers=64)


def test_smollm2_first_layers_reorder_is_exact(smollm2_dir):
    from atom_tvm.datasets import encode, load_text, token_windows
    from atom_tvm.quantization.calibrate import load_float_model

    model = load_float_model(smollm2_dir)
    model.model.layers = model.model.layers[:3]
    model.config.num_hidden_layers = 3
    ids = encode(smollm2_dir / "tokenizer.json", load_text("wikipedia", "train")[:20000])
    stats = collect_stats(model, token_windows(ids, 64, 2))
    check_reorder_is_exact(model, stats, token_windows(ids, 48, 3)[2:], n_outliers=128)
