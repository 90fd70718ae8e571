"""Atom number formats against plain-loop references of the conventions in formats.py.

The references compute in float32 where the documented format does (the kernels do), and use
Python's ``round`` (half to even) independently of ``np.rint``.
"""

from __future__ import annotations

import numpy as np
import pytest

from atom_tvm.errors import UserError
from atom_tvm.quantization.formats import (
    ACTIVATION_CLIP,
    WEIGHT_CLIP,
    AtomActivation,
    AtomWeight,
    check_atom_split,
    dequantize_kv_asym,
    dequantize_sym,
    pack_int4,
    quantize_atom_activation,
    quantize_atom_weight,
    quantize_kv_asym,
    quantize_sym,
    search_clip,
    unpack_int4,
)

rng = np.random.default_rng()


def ref_sym(x: np.ndarray, bits: int, group: int, clip: float = 1.0):
    """Codes and float16 scales of symmetric group quantization, one element at a time."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    rows = x.reshape(-1, x.shape[-1]).astype(np.float32)
    q = np.zeros(rows.shape, np.int64)
    scales = np.zeros((rows.shape[0], rows.shape[1] // group), np.float16)
    for r in range(rows.shape[0]):
        for g in range(rows.shape[1] // group):
            vals = rows[r, g * group : (g + 1) * group]
            amax = max(abs(float(v)) for v in vals)
            s = np.float16(np.float32(amax) * np.float32(clip / qmax))
            inv = np.float32(1) / np.float32(s) if s != 0 else np.float32(0)
            scales[r, g] = s
            for j, v in enumerate(vals):
                code = round(float(v * inv))
                q[r, g * group + j] = min(max(code, qmin), qmax)
    return q.reshape(x.shape), scales.reshape(*x.shape[:-1], -1)


def ref_pack(codes: np.ndarray) -> np.ndarray:
    """Byte j of a row = (code 2j mod 16) + 16 * (code 2j+1 mod 16)."""
    rows = codes.reshape(-1, codes.shape[-1])
    out = np.zeros((rows.shape[0], rows.shape[1] // 2), np.uint8)
    for r in range(rows.shape[0]):
        for j in range(rows.shape[1] // 2):
            out[r, j] = (int(rows[r, 2 * j]) % 16) + 16 * (int(rows[r, 2 * j + 1]) % 16)
    return out.reshape(*codes.shape[:-1], -1)


def varied(shape, group):
    """Random values whose magnitude changes from group to group by up to 1e3x."""
    x = rng.standard_normal(shape)
    mag = 10.0 ** rng.uniform(-1.5, 1.5, (*shape[:-1], shape[-1] // group, 1))
    return (x.reshape(*shape[:-1], -1, group) * mag).reshape(shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Symmetric group quantization
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [64, 128])
@pytest.mark.parametrize("clip", [1.0, WEIGHT_CLIP, ACTIVATION_CLIP, 0.5])
def test_quantize_sym_matches_loop_reference(bits, group, clip):
    x = varied((3, 2, 4 * group), group)
    x[1, 0, group : 2 * group] = 0.0  # one all-zero group
    q, scale = quantize_sym(x, bits, group, clip)
    ref_q, ref_scale = ref_sym(x, bits, group, clip)
    assert q.dtype == np.int8 and q.shape == x.shape
    assert scale.dtype == np.float16 and scale.shape == (3, 2, 4)
    np.testing.assert_array_equal(scale, ref_scale)
    np.testing.assert_array_equal(q, ref_q)
    deq = dequantize_sym(q, scale, group)
    assert deq.dtype == np.float32
    np.testing.assert_array_equal(deq, ref_q * np.repeat(ref_scale.astype(np.float32), group, -1))


@pytest.mark.parametrize("bits", [4, 8])
def test_error_at_most_half_a_step_without_clipping(bits):
    x = varied((64, 4096), 128)
    q, scale = quantize_sym(x, bits, 128)
    qmax = 2 ** (bits - 1) - 1
    assert np.abs(q).max() <= qmax  # clip 1 never needs the extra negative code
    step = np.repeat(scale.astype(np.float64), 128, -1)
    err = np.abs(x.astype(np.float64) - dequantize_sym(q, scale, 128))
    assert (err <= step / 2 * (1 + 1e-4)).all()  # 1e-4: float32 rounding of x * (1 / scale)


def test_scale_is_float16_of_float32_absmax_and_codes_use_it():
    x = np.array([[0.1, -0.3, 0.7, 0.7000001] * 16], np.float32)  # absmax not fp16-exact
    q, scale = quantize_sym(x, 4, 64)
    expected = np.float16(np.float32(0.7000001) * np.float32(1 / 7))
    assert scale[0, 0] == expected
    assert np.float32(expected) != np.float32(0.7000001) * np.float32(1 / 7)  # really rounded
    inv = np.float32(1) / np.float32(expected)
    assert [int(c) for c in q[0, :4]] == [round(float(v * inv)) for v in x[0, :4]]


def test_rounds_half_to_even():
    # absmax 7 gives scale exactly 1, so x is its own unrounded code.
    ties = np.array([7.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5] + [0.0] * 56, np.float32)
    q, scale = quantize_sym(ties[None], 4, 64)
    assert scale[0, 0] == 1.0
    assert q[0, :8].tolist() == [7, 0, 2, 2, 0, -2, -2, 4]


def test_zero_groups_give_zero_without_nan():
    x = np.zeros((2, 128), np.float32)
    x[1, 64:] = rng.standard_normal(64)
    with np.errstate(all="raise"):
        q, scale = quantize_sym(x, 4, 64)
        deq = dequantize_sym(q, scale, 64)
    assert scale[0].tolist() == [0, 0] and scale[1, 0] == 0 and scale[1, 1] > 0
    assert not q[0].any() and not q[1, :64].any()
    assert not deq[0].any() and np.isfinite(deq).all()


def test_clipping_uses_the_full_code_range():
    x = np.linspace(-1, 1, 128, dtype=np.float32)[None]
    q, scale = quantize_sym(x, 4, 128, clip=0.5)
    assert q.min() == -8 and q.max() == 7
    assert scale[0, 0] == np.float16(np.float32(1.0) * np.float32(0.5 / 7))
    deq = dequantize_sym(q, scale, 128)
    s = float(scale[0, 0])
    inside = np.abs(x) <= 7.5 * s * (1 - 1e-3)
    assert (np.abs(x - deq)[inside] <= s / 2 * (1 + 1e-4)).all()
    assert deq[0, -1] == 7 * np.float32(scale[0, 0]) and deq[0, 0] == -8 * np.float32(scale[0, 0])


@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e6])
def test_non_finite_scales_are_refused(bad):
    x = rng.standard_normal((2, 64)).astype(np.float32)
    x[1, 3] = bad
    with pytest.raises(UserError, match="not finite in float16"):
        quantize_sym(x, 4, 64)


def test_bad_arguments_are_refused():
    x = np.ones((2, 96), np.float32)
    with pytest.raises(UserError, match="96 is not a multiple of group size 64"):
        quantize_sym(x, 4, 64)
    with pytest.raises(UserError, match="3-bit"):
        quantize_sym(x, 3, 32)
    with pytest.raises(UserError, match="clip ratio 1.2"):
        quantize_sym(x, 4, 32, clip=1.2)


# ---------------------------------------------------------------------------------------------
# INT4 packing
# ---------------------------------------------------------------------------------------------


def test_pack_round_trips_every_pair_of_codes():
    lo, hi = np.meshgrid(np.arange(-8, 8), np.arange(-8, 8), indexing="ij")
    codes = np.stack([lo.ravel(), hi.ravel()], axis=-1).reshape(1, -1).astype(np.int8)
    packed = pack_int4(codes)
    assert packed.dtype == np.uint8 and packed.shape == (1, 256)
    assert sorted(packed.ravel().tolist()) == list(range(256))  # each byte exactly once
    np.testing.assert_array_equal(packed, ref_pack(codes))
    np.testing.assert_array_equal(unpack_int4(packed), codes)
    assert unpack_int4(packed).dtype == np.int8


def test_nibble_order_low_nibble_is_even_index():
    assert pack_int4(np.array([1, -2], np.int8)).tolist() == [0xE1]
    assert pack_int4(np.array([[-8, 7, 0, -1]], np.int8)).tolist() == [[0x78, 0xF0]]
    assert unpack_int4(np.array([0x9F], np.uint8)).tolist() == [-1, -7]


def test_packing_refusals():
    with pytest.raises(UserError, match="odd number \\(5\\)"):
        pack_int4(np.zeros((3, 5), np.int8))
    with pytest.raises(UserError, match=r"\[-8, 7\], got \[-9, 0\]"):
        pack_int4(np.array([-9, 0], np.int16))
    with pytest.raises(UserError, match="integers"):
        pack_int4(np.array([0.5, 1.0]))
    with pytest.raises(UserError, match="must be uint8"):
        unpack_int4(np.array([1, 2], np.int8))


# ---------------------------------------------------------------------------------------------
# Atom's mixed layout
# ---------------------------------------------------------------------------------------------

VALID_SPLITS = [(576, 64), (1536, 64), (1536, 128), (4096, 64), (4096, 128), (11008, 128)]


@pytest.mark.parametrize("kind", ["weight", "activation"])
@pytest.mark.parametrize("k,group", VALID_SPLITS)
def test_atom_layout_matches_reference(kind, k, group):
    rows, o = 2, 128
    x = varied((rows, k), 64)
    x[:, k - o :] *= 20  # the outlier channels are the large ones
    clip = WEIGHT_CLIP if kind == "weight" else ACTIVATION_CLIP
    quantize, cls = {
        "weight": (quantize_atom_weight, AtomWeight),
        "activation": (quantize_atom_activation, AtomActivation),
    }[kind]
    t = quantize(x, group, o, clip)
    assert type(t) is cls and (t.group_size, t.n_outliers) == (group, o)
    shapes = {"q4": (rows, (k - o) // 2), "s4": (rows, (k - o) // group), "q8": (rows, o)}
    dtypes = {"q4": np.uint8, "s4": np.float16, "q8": np.int8, "s8": np.float16}
    for name, dtype in dtypes.items():
        arr = getattr(t, name)
        assert arr.dtype == dtype and arr.flags.c_contiguous, name
        assert arr.shape == shapes.get(name, (rows, 1)), name

    q4, s4 = ref_sym(x[:, : k - o], 4, group, clip)
    q8, s8 = ref_sym(x[:, k - o :], 8, o)  # outliers are never clipped
    np.testing.assert_array_equal(t.q4, ref_pack(q4))
    np.testing.assert_array_equal(t.s4, s4)
    np.testing.assert_array_equal(t.q8, q8)
    np.testing.assert_array_equal(t.s8, s8)
    deq = t.dequantize()
    assert deq.shape == (rows, k) and deq.dtype == np.float32
    np.testing.assert_array_equal(deq[:, : k - o], q4 * np.repeat(s4.astype(np.float32), group, -1))
    np.testing.assert_array_equal(deq[:, k - o :], q8 * s8.astype(np.float32))
    outlier_err = np.abs(deq[:, k - o :] - x[:, k - o :].astype(np.float64))
    assert (outlier_err <= s8.astype(np.float64) / 2 * (1 + 1e-4)).all()


def test_atom_layout_without_outliers_and_all_outliers():
    x = rng.standard_normal((3, 256)).astype(np.float32)
    none = quantize_atom_weight(x, 128, 0)
    assert none.q8.shape == (3, 0) and none.s8.tolist() == [[0], [0], [0]]
    np.testing.assert_array_equal(none.dequantize(), dequantize_sym(*quantize_sym(x, 4, 128), 128))
    every = quantize_atom_weight(x, 64, 256)
    assert every.q4.shape == (3, 0) and every.s4.shape == (3, 0)
    np.testing.assert_array_equal(every.dequantize(), dequantize_sym(*quantize_sym(x, 8, 256), 256))


@pytest.mark.parametrize(
    "k,group,o,message",
    [
        (576, 128, 128, "hidden size 576 - 128 outliers = 448 is not a multiple of group size "
         "128; use --group-size 64"),
        (1000, 128, 128, "hidden size 1000 - 128 outliers = 872 is not a multiple of group size "
         "128; use --n-outliers 232"),
        (1000, 64, 128, "= 872 is not a multiple of group size 64; use --n-outliers 168"),
        (4096, 96, 128, "group size 96 is not supported; use --group-size 64 or 128"),
        (576, 64, 600, "600 outlier channels do not fit hidden size 576; use --n-outliers "
         "between 0 and 576"),
        (576, 64, -1, "-1 outlier channels do not fit"),
    ],
)
def test_invalid_splits_are_refused_with_a_fix(k, group, o, message):
    with pytest.raises(UserError) as info:
        check_atom_split(k, group, o)
    assert message in str(info.value)
    with pytest.raises(UserError):
        quantize_atom_activation(np.zeros((1, k), np.float32), group, o)


def test_llama_sizes_split_both_ways():
    for k in (4096, 11008, 14336):
        for group in (64, 128):
            check_atom_split(k, group, 128)
    check_atom_split(1536, 128, 128)
    with pytest.raises(UserError, match="expected a 2-D matrix"):
        quantize_atom_weight(np.zeros(576, np.float32), 64)


# ---------------------------------------------------------------------------------------------
# Asymmetric KV cache
# ---------------------------------------------------------------------------------------------


def ref_kv(x: np.ndarray, bits: int):
    """Unpacked codes, scale and zero of the documented min-offset convention, per row."""
    qmax = 2**bits - 1
    rows = x.reshape(-1, x.shape[-1]).astype(np.float32)
    q = np.zeros(rows.shape, np.int64)
    scale = np.zeros((rows.shape[0], 1), np.float16)
    zero = np.zeros((rows.shape[0], 1), np.float16)
    for r, row in enumerate(rows):
        z = np.float16(min(float(v) for v in row))
        span = max(np.float32(max(float(v) for v in row)) - np.float32(z), np.float32(0))
        s = np.float16(span * np.float32(1 / qmax))
        inv = np.float32(1) / np.float32(s) if s != 0 else np.float32(0)
        zero[r, 0], scale[r, 0] = z, s
        for j, v in enumerate(row):
            q[r, j] = min(max(round(float((v - np.float32(z)) * inv)), 0), qmax)
    lead = x.shape[:-1]
    return q.reshape(x.shape), scale.reshape(*lead, 1), zero.reshape(*lead, 1)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_kv_matches_reference_and_error_bound(bits, head_dim):
    x = varied((5, 3, head_dim), head_dim) + rng.uniform(-3, 3, (5, 3, 1)).astype(np.float32)
    q, scale, zero = quantize_kv_asym(x, bits)
    ref_q, ref_scale, ref_zero = ref_kv(x, bits)
    assert q.dtype == np.uint8 and scale.dtype == zero.dtype == np.float16
    assert scale.shape == zero.shape == (5, 3, 1)
    assert q.shape == (5, 3, head_dim // 2 if bits == 4 else head_dim)
    np.testing.assert_array_equal(q, ref_pack(ref_q) if bits == 4 else ref_q)
    np.testing.assert_array_equal(scale, ref_scale)
    np.testing.assert_array_equal(zero, ref_zero)

    deq = dequantize_kv_asym(q, scale, zero, bits)
    assert deq.shape == x.shape and deq.dtype == np.float32
    x64, s, z = x.astype(np.float64), scale.astype(np.float64), zero.astype(np.float64)
    slack = np.abs(x64.min(axis=-1, keepdims=True) - z)  # fp16 rounding of the row minimum
    float32_slack = 1e-6 * np.abs(x64)  # rounding of x - zero and of q * scale + zero
    assert (np.abs(x64 - deq) <= s / 2 + slack + float32_slack).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_kv_rows_of_equal_values_stay_finite(bits):
    values = np.array([0.0, 0.1, -3000.7, 1e-8, 65504.0], np.float32)
    x = np.repeat(values[:, None], 64, axis=1)
    with np.errstate(divide="raise", invalid="raise"):  # fp16 underflow to 0 is expected
        q, scale, zero = quantize_kv_asym(x, bits)
        deq = dequantize_kv_asym(q, scale, zero, bits)
    assert np.isfinite(deq).all()
    np.testing.assert_allclose(deq, x, rtol=2**-11, atol=1e-7)


def test_kv_refusals():
    with pytest.raises(UserError, match="3-bit KV"):
        quantize_kv_asym(np.zeros((2, 64)), 3)
    with pytest.raises(UserError, match="odd number"):
        quantize_kv_asym(np.zeros((2, 63)), 4)
    with pytest.raises(UserError, match="not finite"):
        quantize_kv_asym(np.full((2, 64), np.nan), 8)


# ---------------------------------------------------------------------------------------------
# Clip search
# ---------------------------------------------------------------------------------------------


def test_search_clip_picks_the_least_mse_candidate():
    heavy = rng.standard_t(4, (64, 1024)).astype(np.float32)  # tails heavy enough that clipping pays, but no single sample outweighs the rest (t(2) sometimes did)

    def mse(clip):
        return np.mean((dequantize_sym(*quantize_sym(heavy, 4, 128, clip), 128) - heavy) ** 2)

    best = search_clip(heavy, 128, 4)
    grid = np.linspace(0.7, 1.0, 13)
    assert best in grid and best < 1.0
    assert all(mse(best) <= mse(c) for c in grid)
    assert search_clip(heavy, 128, 4, candidates=[1.0]) == 1.0
