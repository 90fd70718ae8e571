"""bench/o_proj_layout_accuracy.py's masked o_proj layout, on a random tiny Llama: the expanded o_proj
(``[W * mask, W[:, outliers]]`` fed ``[x * mask, x[:, outliers]]``) computes what the original does,
its derived calibration statistics equal those collected on the expanded model, and the reorder then
leaves it in place (its outliers are already last)."""

from __future__ import annotations

import numpy as np
import pytest

from atom_tvm.quantization.reorder import outlier_permutation

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from atom_tvm.quantization.calibrate import collect_stats  # noqa: E402
from bench_scripts import load_bench_script  # noqa: E402
from test_calibrate import random_windows, tiny_llama  # noqa: E402

OUTLIERS = 64


@pytest.fixture(scope="module")
def study():
    return load_bench_script("o_proj_layout_accuracy")


def test_masked_o_proj_is_the_same_model_with_the_derived_statistics(study):
    model = tiny_llama(seed=3)
    windows = random_windows(3, 24, seed=5)
    stats = collect_stats(model, windows, hessian=True)
    outliers = study.o_proj_outliers(stats, len(model.model.layers), OUTLIERS)
    ids = torch.as_tensor(windows[:1])
    with torch.no_grad():
        before = model(input_ids=ids).logits

    study.prepend_expansions(study.mask_o_proj(model, outliers))
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert float((after - before).abs().max() / before.abs().max()) < 1e-5

    derived = study.masked_stats(stats, outliers)
    measured = collect_stats(model, windows, hessian=True)
    k = model.config.hidden_size
    for i, outl in enumerate(outliers):
        name = f"model.layers.{i}.self_attn.o_proj"
        assert measured.sumsq_for(name).shape == (k + OUTLIERS,)
        # layer 1 sees layer 0's float32 rounding of W'x' against Wx: compare at the statistics' scale
        for got, want in ((derived.sumsq_for(name), measured.sumsq_for(name)),
                          (derived.hessian_for(name), measured.hessian_for(name))):
            assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
        assert not derived.sumsq_for(name)[outl].any()  # the outliers' original places are zeroed
        np.testing.assert_array_equal(outlier_permutation(derived.sumsq_for(name), OUTLIERS), np.arange(k + OUTLIERS))
    q = "model.layers.0.self_attn.q_proj"
    np.testing.assert_array_equal(derived.sumsq_for(q), stats.sumsq_for(q))  # other sites untouched
