"""atom_tvm.quantization.reorder: outliers moved last, folded where possible, the rest as runtime indices.

The reordered model with its runtime indices applied must compute what the original computes (fp32,
1e-5), on a random tiny Llama and on SmolLM2's first layers with their real weights and real
calibration statistics; the channels moved last must be the top-K by sum of squares.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest

from atom_tvm.errors import UserError
from atom_tvm.quantization.reorder import (NORM_SITES, RESIDUAL_ORDERS, RUNTIME_SITES, SITE_LINEARS,
                                           attach_runtime_indices, outlier_permutation, plan_reorder,
                                           reorder_model, shared_residual_sumsq)

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


def check_reorder_is_exact(model, stats, ids: np.ndarray, n_outliers: int, residual_order: str) -> None:
    x = torch.as_tensor(ids)
    with torch.no_grad():
        ref = model(x).logits
    reordered = copy.deepcopy(model)
    plan, indices = reorder_model(reordered, stats, n_outliers, residual_order)
    # down_proj's input is folded; in the shared order so are the norms' (the stream is stored permuted)
    assert {tuple(sites) for sites in indices.values()} == {RUNTIME_SITES[residual_order]}
    with torch.no_grad():
        assert rel_err(reordered(x).logits, ref) > 1e-2  # without its runtime indices it is another model
        attach_runtime_indices(reordered, indices)
        assert rel_err(reordered(x).logits, ref) < 1e-5

    shared_sumsq = shared_residual_sumsq(stats, len(model.model.layers))
    for i, perms in plan.items():
        for site, linear in SITE_LINEARS.items():
            sumsq, perm = stats.sumsq_for(f"model.layers.{i}.{linear}"), perms[site]
            if residual_order == "shared" and site in NORM_SITES:
                sumsq = shared_sumsq
            assert sorted(perm) == list(range(len(sumsq)))
            top = set(np.argsort(sumsq)[-n_outliers:])
            assert set(perm[-n_outliers:]) == top
            assert np.all(np.diff(perm[:-n_outliers]) > 0)  # the ordinary channels keep their order
            if site in indices[i]:
                assert np.array_equal(indices[i][site], perm)
    # Folded weights: consumer columns and norm weights follow their site, gate/up rows follow down_in;
    # in the shared order the stream's writers' rows and its readers' columns follow the norm sites'.
    layer, orig, p = reordered.model.layers[0], model.model.layers[0], plan[0]
    stream = p["attn_in"] if residual_order == "shared" else np.arange(len(p["attn_in"]))
    assert torch.equal(layer.self_attn.q_proj.weight, orig.self_attn.q_proj.weight[:, p["attn_in"]])
    assert torch.equal(layer.input_layernorm.weight, orig.input_layernorm.weight[p["attn_in"]])
    assert torch.equal(layer.self_attn.o_proj.weight, orig.self_attn.o_proj.weight[stream][:, p["o_in"]])
    assert torch.equal(layer.mlp.up_proj.weight, orig.mlp.up_proj.weight[p["down_in"]][:, p["mlp_in"]])
    assert torch.equal(layer.mlp.down_proj.weight, orig.mlp.down_proj.weight[stream][:, p["down_in"]])
    assert torch.equal(reordered.model.embed_tokens.weight, model.model.embed_tokens.weight[:, stream])
    assert torch.equal(reordered.model.norm.weight, model.model.norm.weight[stream])
    assert torch.equal(reordered.lm_head.weight, model.lm_head.weight[:, stream])


@pytest.mark.parametrize("residual_order", RESIDUAL_ORDERS)
@pytest.mark.parametrize("tied", [False, True])
def test_tiny_llama_reorder_is_exact(residual_order, tied):
    model = tiny_llama(seed=3, tie_word_embeddings=tied)
    stats = collect_stats(model, random_windows(2, 32))
    check_reorder_is_exact(model, stats, random_windows(2, 40, seed=1), 64, residual_order)


def test_shared_residual_order_ranks_every_norm_site_normalized():
    """One site with huge activations must not pick the order alone: each site counts with sum 1."""
    model = tiny_llama(seed=3)
    stats = collect_stats(model, random_windows(2, 32))
    key = stats.sites["model.layers.0.self_attn.q_proj"]
    loud = dict(stats.sumsq)
    loud[key] = loud[key] * 1e6
    shared = shared_residual_sumsq(dataclasses.replace(stats, sumsq=loud), len(model.model.layers))
    np.testing.assert_allclose(shared, shared_residual_sumsq(stats, len(model.model.layers)), rtol=1e-6)
    n_sites = 2 * len(model.model.layers)
    np.testing.assert_allclose(shared.sum(), n_sites, rtol=1e-6)
    with pytest.raises(UserError, match="--residual-order"):
        plan_reorder(stats, 2, 64, residual_order="global")


@pytest.mark.parametrize("residual_order", RESIDUAL_ORDERS)
def test_smollm2_first_layers_reorder_is_exact(residual_order, smollm2_dir):
    from atom_tvm.datasets import encode, load_text, token_windows
    from atom_tvm.quantization.calibrate import load_float_model

    model = load_float_model(smollm2_dir)
    model.model.layers = model.model.layers[:3]
    model.config.num_hidden_layers = 3
    ids = encode(smollm2_dir / "tokenizer.json", load_text("wikipedia", "train")[:20000])
    stats = collect_stats(model, token_windows(ids, 64, 2))
    check_reorder_is_exact(model, stats, token_windows(ids, 48, 3)[2:], 128, residual_order)
