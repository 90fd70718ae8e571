"""atom_tvm.quantization.reorder: outliers moved last, folded where possible, the rest as runtime indices.

The reordered model with its runtime indices applied must compute what the original computes (fp32,
1e-5), on a random tiny Llama and on SmolLM2's first layers with their real weights and real
calibration statistics, for both residual orders and both o_proj outlier layouts; the channels moved
last must be the top-K by sum of squares. The masked o_proj's derived calibration statistics must
equal those collected on the expanded model.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest

from atom_tvm.errors import UserError
from atom_tvm.quantization.reorder import (NORM_SITES, O_PROJ_OUTLIERS, RESIDUAL_ORDERS, RUNTIME_SITES,
                                           SITE_LINEARS, MaskedOutliers, attach_runtime_indices, expand_o_proj,
                                           outlier_permutation, plan_reorder, reorder_model,
                                           shared_residual_sumsq)

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


def check_reorder_is_exact(model, stats, ids: np.ndarray, n_outliers: int, residual_order: str,
                           o_proj_outliers: str) -> None:
    x = torch.as_tensor(ids)
    with torch.no_grad():
        ref = model(x).logits
    reordered = copy.deepcopy(model)
    done = reorder_model(reordered, stats, n_outliers, residual_order, o_proj_outliers=o_proj_outliers)
    plan, indices = done.plan, done.indices
    # down_proj's input is folded; in the shared order so are the norms' (the stream is stored permuted);
    # a masked o_proj expands its own input in place
    runtime = tuple(s for s in RUNTIME_SITES[residual_order] if s != "o_in" or o_proj_outliers == "gathered")
    assert {tuple(sites) for sites in indices.values()} == {runtime}
    with torch.no_grad():
        if runtime:
            assert rel_err(reordered(x).logits, ref) > 1e-2  # without its runtime indices it is another model
        attach_runtime_indices(reordered, indices)
        assert rel_err(reordered(x).logits, ref) < 1e-5

    shared_sumsq = shared_residual_sumsq(stats, len(model.model.layers))
    for i, perms in plan.items():
        for site, linear in SITE_LINEARS.items():
            sumsq, perm = stats.sumsq_for(f"model.layers.{i}.{linear}"), perms[site]
            if residual_order == "shared" and site in NORM_SITES:
                sumsq = shared_sumsq
            top = set(np.argsort(sumsq)[-n_outliers:])
            if site == "o_in" and o_proj_outliers == "masked":
                assert np.array_equal(perm, np.arange(len(sumsq) + n_outliers))  # left in place
                assert set(done.masked[i].outliers[0]) == top
                continue
            assert sorted(perm) == list(range(len(sumsq)))
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
    o_proj = orig.self_attn.o_proj.weight[stream]
    if o_proj_outliers == "masked":
        masked = done.masked[0]
        o_proj = o_proj[:, masked.source].masked_fill(torch.as_tensor(~masked.keep), 0)
    assert torch.equal(layer.self_attn.o_proj.weight, o_proj[:, p["o_in"]])
    assert torch.equal(layer.mlp.up_proj.weight, orig.mlp.up_proj.weight[p["down_in"]][:, p["mlp_in"]])
    assert torch.equal(layer.mlp.down_proj.weight, orig.mlp.down_proj.weight[stream][:, p["down_in"]])
    assert torch.equal(reordered.model.embed_tokens.weight, model.model.embed_tokens.weight[:, stream])
    assert torch.equal(reordered.model.norm.weight, model.model.norm.weight[stream])
    assert torch.equal(reordered.lm_head.weight, model.lm_head.weight[:, stream])


@pytest.mark.parametrize("o_proj_outliers", O_PROJ_OUTLIERS)
@pytest.mark.parametrize("residual_order", RESIDUAL_ORDERS)
@pytest.mark.parametrize("tied", [False, True])
def test_tiny_llama_reorder_is_exact(residual_order, o_proj_outliers, tied):
    model = tiny_llama(seed=3, tie_word_embeddings=tied)
    stats = collect_stats(model, random_windows(2, 32))
    check_reorder_is_exact(model, stats, random_windows(2, 40, seed=1), 64, residual_order, o_proj_outliers)


def test_masked_o_proj_without_outliers_is_the_model_in_order():
    """--n-outliers 0: o_proj keeps its K inputs, nothing is copied, and the checkpoint still gets
    its (empty) outlier index, so the package's masked quantizer finds its parameters."""
    model = tiny_llama(seed=3)
    stats = collect_stats(model, random_windows(2, 32))
    ids = torch.as_tensor(random_windows(2, 40, seed=1))
    with torch.no_grad():
        ref = model(ids).logits
        done = reorder_model(model, stats, 0, "shared", o_proj_outliers="masked")
        assert rel_err(model(ids).logits, ref) < 1e-5
    k = model.config.hidden_size
    assert model.model.layers[0].self_attn.o_proj.in_features == k
    assert done.masked[0].outliers.shape == (1, 0) and done.masked[0].keep.all()


def test_masked_outliers_expand_each_block_in_place():
    sumsq = np.array([5.0, 1.0, 9.0, 2.0, 0.5, 7.0, 3.0, 8.0])
    one = MaskedOutliers.choose(sumsq, 2)
    assert one.outliers.tolist() == [[2, 7]]
    assert one.source.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 2, 7]
    assert one.keep.tolist() == [True, True, False, True, True, True, True, False, True, True]
    two = MaskedOutliers.choose(sumsq, 1, blocks=2)  # each half its own outlier, counted within it
    assert two.outliers.tolist() == [[2], [3]]
    assert two.source.tolist() == [0, 1, 2, 3, 2, 4, 5, 6, 7, 7]
    assert two.keep.tolist() == [True, True, False, True, True, True, True, True, False, True]


@pytest.mark.parametrize("shards", [1, 2])
def test_expanded_o_proj_is_the_same_model_with_the_derived_statistics(shards):
    model = tiny_llama(seed=3)
    windows = random_windows(3, 24, seed=5)
    stats = collect_stats(model, windows, hessian=True)
    ids = torch.as_tensor(windows[:1])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    derived, masked = expand_o_proj(model, stats, 16, shards)
    with torch.no_grad():
        assert rel_err(model(input_ids=ids).logits, before) < 1e-5

    measured = collect_stats(model, windows, hessian=True)
    k = model.config.hidden_size
    for i, m in masked.items():
        name = f"model.layers.{i}.self_attn.o_proj"
        assert measured.sumsq_for(name).shape == (k + shards * 16,)
        # layer 1 sees layer 0's float32 rounding of W'x' against Wx: compare at the statistics' scale
        for got, want in ((derived.sumsq_for(name), measured.sumsq_for(name)),
                          (derived.hessian_for(name), measured.hessian_for(name))):
            assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
        assert not derived.sumsq_for(name)[~m.keep].any()  # the outliers' original places are zeroed
    q = "model.layers.0.self_attn.q_proj"
    np.testing.assert_array_equal(derived.sumsq_for(q), stats.sumsq_for(q))  # other sites untouched


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
    with pytest.raises(UserError, match="--o-proj-outliers"):
        plan_reorder(stats, 2, 64, o_proj_outliers="scattered")


@pytest.mark.parametrize("residual_order, o_proj_outliers", [("per-layer", "gathered"), ("shared", "masked")])
def test_smollm2_first_layers_reorder_is_exact(residual_order, o_proj_outliers, smollm2_dir):
    from atom_tvm.datasets import encode, load_text, token_windows
    from atom_tvm.quantization.calibrate import load_float_model

    model = load_float_model(smollm2_dir)
    model.model.layers = model.model.layers[:3]
    model.config.num_hidden_layers = 3
    ids = encode(smollm2_dir / "tokenizer.json", load_text("wikipedia", "train")[:20000])
    stats = collect_stats(model, token_windows(ids, 64, 2))
    check_reorder_is_exact(model, stats, token_windows(ids, 48, 3)[2:], 128, residual_order, o_proj_outliers)
