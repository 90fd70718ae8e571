"""GPTQ against the one-channel-at-a-time OBS reference, RTN, and the format's grid."""

from __future__ import annotations

import numpy as np
import pytest

from atom_tvm.errors import UserError
from atom_tvm.quantization.formats import (
    int_range,
    quantize_atom_weight,
    round_to_grid,
    symmetric_scale,
    unpack_int4,
)
from atom_tvm.quantization.gptq import gptq

rng = np.random.default_rng()


def calibration(tokens: int, k: int, n_outliers: int) -> np.ndarray:
    """Correlated inputs X = Z A, the last ``n_outliers`` channels with 10x the variance."""
    mixing = rng.standard_normal((k, k)) / np.sqrt(k) + np.eye(k)
    x = rng.standard_normal((tokens, k)) @ mixing
    x[:, k - n_outliers :] *= 10
    return x


def weight(n: int, k: int) -> np.ndarray:
    return (rng.standard_normal((n, k)) * 0.02).astype(np.float32)


def ref_gptq(w, h, group, n_outliers, clip, damp=0.01):
    """Optimal Brain Surgeon order: quantize channel i, move its error onto the later channels
    through the inverse Hessian, then remove channel i from that inverse. No blocks, no
    Cholesky. Returns codes [N, K] and the scale used for every channel [N, K]."""
    w, h = w.astype(np.float64).copy(), h.copy()
    n, k = w.shape
    for i in range(k):
        if h[i, i] == 0:
            h[i, i], w[:, i] = 1.0, 0.0
    h += damp * np.mean(np.diag(h)) * np.eye(k)
    hinv = np.linalg.inv(h)
    normal = k - n_outliers
    codes, scales = np.zeros((n, k), np.int64), np.zeros((n, k))
    for i in range(k):
        if i < normal:
            bits, first, last, ratio = 4, i - i % group, i - i % group + group, clip
        else:
            bits, first, last, ratio = 8, normal, k, 1.0
        if i == first:
            scale = symmetric_scale(np.abs(w[:, first:last]).max(axis=1), bits, ratio)
        q = round_to_grid(w[:, i], scale, *int_range(bits))
        codes[:, i], scales[:, i] = q, scale
        err = (w[:, i] - q * scale.astype(np.float64)) / hinv[i, i]
        w[:, i:] -= np.outer(err, hinv[i, i:])
        hinv -= np.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]
    return codes, scales


def codes_and_scales(t):
    """Per-channel codes [N, K] and scales [N, K] of an AtomWeight."""
    s4 = np.repeat(t.s4.astype(np.float64), t.group_size, axis=1)
    s8 = np.repeat(t.s8.astype(np.float64), t.n_outliers, axis=1)
    codes = np.concatenate([unpack_int4(t.q4), t.q8], axis=1).astype(np.int64)
    return codes, np.concatenate([s4, s8], axis=1)


@pytest.mark.parametrize(
    "k,group,n_outliers,block",
    [(384, 64, 128, 128), (448, 128, 192, 128), (320, 64, 0, 64), (256, 128, 256, 128)],
)
def test_matches_the_obs_reference(k, group, n_outliers, block):
    # (448, 128, 192): the INT8 block spans two GPTQ blocks; the others: no outliers, all.
    x = calibration(4 * k, k, n_outliers)
    w = weight(48, k)
    h = x.T @ x
    codes, scales = codes_and_scales(gptq(w, h, group, n_outliers, 0.9, block_size=block))
    ref_codes, ref_scales = ref_gptq(w, h, group, n_outliers, 0.9)
    np.testing.assert_array_equal(scales, ref_scales)
    # Float64 rounding differences may flip a code sitting exactly on a rounding tie.
    assert np.mean(codes != ref_codes) < 1e-3


@pytest.mark.parametrize("k,group", [(576, 64), (768, 64), (768, 128)])
def test_output_error_beats_round_to_nearest(k, group):
    n_outliers = 128
    x = calibration(2048, k, n_outliers)
    w = weight(128, k)
    y = x @ w.T.astype(np.float64)
    rtn = quantize_atom_weight(w, group, n_outliers, clip=0.85)
    ours = gptq(w, x.T @ x, group, n_outliers, clip=0.85)
    err_rtn = np.linalg.norm(y - x @ rtn.dequantize().T.astype(np.float64))
    err_gptq = np.linalg.norm(y - x @ ours.dequantize().T.astype(np.float64))
    print(f"K={k} G={group}: output error RTN {err_rtn:.4g} GPTQ {err_gptq:.4g}")
    assert err_gptq < 0.9 * err_rtn


def test_result_is_on_the_format_grid():
    k, group, n_outliers = 576, 64, 128
    x = calibration(1024, k, n_outliers)
    t = gptq(weight(64, k), x.T @ x, group, n_outliers, clip=0.85)
    for name, dtype, shape in [
        ("q4", np.uint8, (64, 224)),
        ("s4", np.float16, (64, 7)),
        ("q8", np.int8, (64, 128)),
        ("s8", np.float16, (64, 1)),
    ]:
        arr = getattr(t, name)
        assert arr.dtype == dtype and arr.shape == shape and arr.flags.c_contiguous, name
    codes, scales = codes_and_scales(t)
    deq = t.dequantize().astype(np.float64)
    # Re-quantizing the result with its own scales gives back its own codes, value by value.
    for row in range(deq.shape[0]):
        for col in range(k):
            s = np.float32(scales[row, col])
            requant = round(float(np.float32(deq[row, col]) * (np.float32(1) / s))) if s else 0
            assert requant == codes[row, col]


def test_diagonal_hessian_is_round_to_nearest():
    # Uncorrelated inputs: no error can be compensated, so GPTQ must equal RTN bit for bit.
    w = weight(32, 576)
    h = np.diag(rng.uniform(0.5, 2.0, 576))
    ours, rtn = gptq(w, h, 64, 128, clip=0.85), quantize_atom_weight(w, 64, 128, clip=0.85)
    for name in ("q4", "s4", "q8", "s8"):
        np.testing.assert_array_equal(getattr(ours, name), getattr(rtn, name), err_msg=name)


def test_dead_input_channels_are_zero_and_finite():
    k = 384
    x = calibration(1024, k, 128)
    x[:, [5, 200, k - 1]] = 0.0  # two INT4 channels and one outlier channel never fire
    with np.errstate(divide="raise", invalid="raise"):
        t = gptq(weight(16, k), x.T @ x, 128, 128)
    deq = t.dequantize()
    assert np.isfinite(deq).all()
    assert not deq[:, [5, 200, k - 1]].any()


def test_refusals():
    w = weight(4, 576)
    h = np.eye(576)
    with pytest.raises(UserError, match="use --group-size 64"):
        gptq(w, h, 128, 128)
    with pytest.raises(UserError, match="Hessian shape \\(512, 512\\)"):
        gptq(w, np.eye(512), 64, 128)
    h[3, 3] = np.nan
    with pytest.raises(UserError, match="NaN/inf"):
        gptq(w, h, 64, 128)
    with pytest.raises(UserError, match="block size 96"):
        gptq(w, np.eye(576), 64, 128, block_size=96)
