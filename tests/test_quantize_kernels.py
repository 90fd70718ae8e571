"""The fused activation quantizers (tir_kernels/quantize.py) against their numpy references.

CPU builds run everywhere (CI proves indexing, packing and rounding with them); CUDA builds are
compiled with nvcc for sm_80 and sm_90a on this GPU-less host; the `gpu` tests run the CUDA
kernels on a real GPU.

Tolerance. `rmsnorm_quantize`, `rmsnorm_reorder_quantize`, `reorder_quantize` and
`outlier_mask_quantize` use only correctly rounded float32 operations in a fixed order (see the
kernel module), so they must match their references bit for bit, on the CPU and on the GPU.
`silu_mul_quantize` calls ``exp``: the reference rounds the exact exponential and divides
exactly, libm's ``expf`` is within ~0.5 ulp, CUDA's ``__fdividef`` within 2 ulp and its
``__expf`` (``expf`` under TVM's --use_fast_math) within 2 + 1.2 |g| ulp, so ``y`` may differ by
a few float32 ulp (a few 1e-7 relative for the gate values of real activations). That can move a
float16 scale by 1 ulp (when ``absmax * clip/qmax`` lies that close to a float16 rounding
boundary) and a code by 1 (when ``y * r`` lies within ~1e-6 relative of a half-integer). The
tolerant check therefore accepts scales within 1 float16 ulp and recomputes the expected codes
from the reference values with the kernel's own scales, allowing a difference of 1 only where the
reference ``y * r`` is within 1e-6 relative of a rounding boundary.
"""

from __future__ import annotations

import math
import shutil
from fractions import Fraction

import numpy as np
import pytest
import tvm

from atom_tvm import cuda_build
from atom_tvm.errors import UserError
from atom_tvm.quantization.formats import masked_outliers, outlier_mask, unpack_int4
from tir_kernels import quantize as qk

CLIP = 0.9
EPS = 1e-5
BOUNDARY_RTOL = 1e-6
ROWS = (1, 7, 33)
# (K, G, O): the brief's hidden sizes, plus a K whose 8-channel chunks leave the last of the
# threads' steps partial (11008 / 8 = 1376 = 10 * 128 + 96 = 5 * 256 + 96) and the O = 0 layout.
# For the masked kind K is the input width (attention's heads * head_dim) and the layout has K + O
# channels (`layout_channels`).
SHAPES = [(576, 64, 128), (1536, 64, 128), (4096, 128, 128)]
EXTRA_SHAPES = [(11008, 128, 128), (576, 64, 0)]
KINDS = ("rmsnorm", "rmsnorm_inorder", "silu", "reorder", "masked")


@pytest.fixture
def rng():
    """Fresh inputs every run; the seed is printed so a failure can be replayed."""
    seed = np.random.SeedSequence().entropy
    print(f"input seed {seed}")
    return np.random.default_rng(seed)


# ------------------------------------------------------------------------------ inputs / runs


def layout_channels(kind: str, k: int, n_outliers: int) -> int:
    """Channels of the output layout: the masked kind copies its O outliers after its K inputs."""
    return k + n_outliers if kind == "masked" else k


def make_inputs(kind: str, rows: int, k: int, group_size: int, n_outliers: int,
                rng: np.random.Generator) -> dict:
    """Random fp16 inputs with the cases that break quantizers: outlier spikes, an all-zero row,
    an all-zero INT4 group (in the kernel's output order) and a zero outlier block."""
    # rmsnorm_inorder's and masked's inputs are already in output order: the identity places
    # the zero cases.
    in_order = kind in ("rmsnorm_inorder", "masked")
    index = np.arange(k, dtype=np.int32) if in_order else rng.permutation(k).astype(np.int32)
    width = 2 * k if kind == "silu" else k
    x = (rng.standard_normal((rows, width)) * rng.uniform(0.2, 4.0, (rows, 1))).astype(np.float16)
    if kind == "masked":
        # O distinct channels in random order (the INT8 block's order), 10-50x larger than the
        # rest, as o_proj's outlier channels are: left in their INT4 groups, they would set the
        # groups' scales.
        outliers = rng.choice(k, size=n_outliers, replace=False).astype(np.int32)
        x[:, outliers] = (x[:, outliers].astype(np.float32) * rng.uniform(10, 50, n_outliers)).astype(np.float16)
    # Spikes: a few channels per row 30-300x larger, as real outlier channels are. SiLU-mul multiplies
    # two spiked values (larger spikes overflow the float16 INT8 scale), and a masked spike may land
    # on an outlier channel already 10-50x larger (overflowing float16 itself), so theirs stay at 3-30x.
    spike = (3, 30) if kind in ("silu", "masked") else (30, 300)
    for r in range(rows):
        cols = rng.choice(width, size=min(8, width), replace=False)
        x[r, cols] = (x[r, cols].astype(np.float32) * rng.uniform(*spike, cols.size)).astype(np.float16)
    if rows > 1:
        x[1] = 0
    if rows > 2:
        if kind == "silu":
            x[2, k : k + group_size] = 0  # up = 0 zeroes output group 0
        else:
            x[2, index[group_size : 2 * group_size]] = 0  # input channels of output group 1
    if rows > 3 and kind != "silu":
        x[3, outliers[-1:] if kind == "masked" else index[-1:]] = 0  # one more zero among the outliers
    inputs = {"x": x}
    if kind == "masked":
        inputs["outliers"] = outliers
        inputs["outlier_mask"] = outlier_mask(outliers, k)
    if kind.startswith("rmsnorm"):
        inputs["weight"] = (1 + 0.3 * rng.standard_normal(k)).astype(np.float16)
    if kind in ("rmsnorm", "reorder"):
        inputs["index"] = index
    return inputs


def kernel_and_ref(kind: str, k: int, group_size: int, n_outliers: int, variant: str, inputs: dict):
    """(PrimFunc, ordered numpy args, reference AtomActivation, reference float32 values)."""
    x = inputs["x"]
    if kind == "rmsnorm":
        func = qk.rmsnorm_reorder_quantize(k, group_size, n_outliers, CLIP, EPS, variant)
        args = [x, inputs["weight"], inputs["index"]]
        ref = qk.rmsnorm_reorder_quantize_ref(x, inputs["weight"], inputs["index"], group_size,
                                              n_outliers, CLIP, EPS)
        values = qk.rmsnorm_ref(x, inputs["weight"], EPS)[:, inputs["index"]]
    elif kind == "rmsnorm_inorder":
        func = qk.rmsnorm_quantize(k, group_size, n_outliers, CLIP, EPS, variant)
        args = [x, inputs["weight"]]
        ref = qk.rmsnorm_quantize_ref(x, inputs["weight"], group_size, n_outliers, CLIP, EPS)
        values = qk.rmsnorm_ref(x, inputs["weight"], EPS)
    elif kind == "silu":
        func = qk.silu_mul_quantize(k, group_size, n_outliers, CLIP, variant)
        args = [x]
        ref = qk.silu_mul_quantize_ref(x, group_size, n_outliers, CLIP)
        values = qk.silu_mul_ref(x)
    elif kind == "masked":
        func = qk.outlier_mask_quantize(k, group_size, n_outliers, CLIP, variant)
        args = [x, inputs["outliers"], inputs["outlier_mask"]]
        ref = qk.outlier_mask_quantize_ref(x, inputs["outliers"], group_size, n_outliers, CLIP)
        values = masked_outliers(x, inputs["outliers"])
    else:
        func = qk.reorder_quantize(k, group_size, n_outliers, CLIP, variant)
        args = [x, inputs["index"]]
        ref = qk.reorder_quantize_ref(x, inputs["index"], group_size, n_outliers, CLIP)
        values = x.astype(np.float32)[:, inputs["index"]]
    return func, args, ref, values


def run(exe, func, args, rows, k, group_size, n_outliers, dev) -> list[np.ndarray]:
    """Run a built kernel on ``dev`` with poisoned outputs (so an unwritten element shows)."""
    outs = []
    for shape, dtype in qk.output_shapes(rows, k, group_size, n_outliers):
        poison = np.full(shape, 0x7B, np.uint8).view(dtype) if dtype in ("uint8", "int8") else \
            np.full(shape, np.nan, dtype)
        outs.append(tvm.runtime.tensor(poison, dev))
    exe[func.attrs["global_symbol"]](*[tvm.runtime.tensor(a, dev) for a in args], *outs)
    return [o.numpy() for o in outs]


# ------------------------------------------------------------------------------ comparisons


def assert_exact(got, ref, what="", values=None):
    """Bit-for-bit equality of all four outputs; a failure lists every field's first mismatches
    with both values (a scale 1 ulp off and a code off at a tie tell different stories)."""
    problems = []
    for name, a, b in zip(("q4", "s4", "q8", "s8"), got, (ref.q4, ref.s4, ref.q8, ref.s8)):
        assert a.shape == b.shape and a.dtype == b.dtype, f"{what} {name}"
        # Compared as bits, so -0 vs +0 or a NaN in an unwritten element cannot slip through.
        bits = {1: np.uint8, 2: np.uint16}[a.itemsize]
        bad = np.argwhere(np.ascontiguousarray(a).view(bits) != np.ascontiguousarray(b).view(bits))
        if len(bad):
            pairs = [(idx.tolist(), a[tuple(idx)].item(), b[tuple(idx)].item()) for idx in bad[:3]]
            problems.append(f"{name}: {len(bad)} differ, (index, got, ref) {pairs}")
            if name == "q4" and values is not None:
                # Each differing byte's two values, both scales, and the codes recomputed in
                # exact rational arithmetic (independent of numpy) from either scale.
                group = ref.q4.shape[1] * 2 // ref.s4.shape[1]
                for r, byte in bad[:3]:
                    g = 2 * byte // group
                    vals = values[r, 2 * byte:2 * byte + 2]
                    problems.append(
                        f"y[{r},{2 * byte}:{2 * byte + 2}] = {vals.tolist()}, s4 got/ref "
                        f"{got[1][r, g]}/{ref.s4[r, g]}, exact codes with ref scale "
                        f"{[_exact_code(v, ref.s4[r, g]) for v in vals]}, with got scale "
                        f"{[_exact_code(v, got[1][r, g]) for v in vals]}")
    assert not problems, f"{what}: " + "; ".join(problems)


def _round_f32(q: Fraction) -> Fraction:
    """q rounded to the nearest float32, ties to even (exact, no numpy)."""
    if q == 0:
        return q
    exp = math.floor(math.log2(abs(q)))
    while abs(q) >= Fraction(2) ** (exp + 1):
        exp += 1
    while abs(q) < Fraction(2) ** exp:
        exp -= 1
    ulp = Fraction(2) ** (max(exp, -126) - 23)
    return round(q / ulp) * ulp  # round() on a Fraction rounds half to even


def _exact_code(value, scale) -> int:
    """clamp(rint(value * float32(1 / scale)), -8, 7) in exact arithmetic (diagnostics only)."""
    if float(scale) == 0:
        return 0
    recip = _round_f32(1 / Fraction(float(scale)))
    t = _round_f32(Fraction(float(value)) * recip)
    return int(min(max(round(t), -8), 7))


def _codes_close(codes, values, scale, qmin, qmax, what):
    """Codes vs the reference values quantized with the kernel's scale (``scale`` broadcasts)."""
    s32 = scale.astype(np.float32)
    recip = np.zeros_like(s32)
    np.divide(np.float32(1), s32, out=recip, where=s32 != 0)
    t = values * recip
    expected = np.clip(np.rint(t), qmin, qmax)
    diff = codes.astype(np.int32) - expected.astype(np.int32)
    near_tie = np.abs(np.abs(t - np.floor(t)) - np.float32(0.5)) <= BOUNDARY_RTOL * np.abs(t)
    bad = (diff != 0) & ~((np.abs(diff) == 1) & near_tie)
    assert not bad.any(), f"{what}: {bad.sum()} codes off, first at {np.argwhere(bad)[:3].tolist()}"
    # A tolerance that excuses most elements would hide a real error.
    assert (diff != 0).mean() < 1e-3, f"{what}: {(diff != 0).sum()} codes at rounding boundaries"


def assert_close(got, ref, values, group_size, n_outliers):
    """The tolerant comparison of the module docstring."""
    q4, s4, q8, s8 = got
    for name, a, b in (("s4", s4, ref.s4), ("s8", s8, ref.s8)):
        assert a.shape == b.shape and a.dtype == np.float16, name
        ulps = np.abs(a.view(np.int16).astype(np.int32) - b.view(np.int16).astype(np.int32))
        assert ulps.max(initial=0) <= 1, f"{name}: scales {ulps.max()} float16 ulp apart"
    rows, k = values.shape
    normal = k - n_outliers
    groups = values[:, :normal].reshape(rows, normal // group_size, group_size)
    codes = unpack_int4(q4).reshape(groups.shape)
    _codes_close(codes, groups, s4[..., None], -8, 7, "q4")
    if n_outliers:
        _codes_close(q8, values[:, normal:], s8, -128, 127, "q8")


def check(kind, got, ref, values, group_size, n_outliers, what=""):
    if kind == "silu":
        assert_close(got, ref, values, group_size, n_outliers)
    else:
        assert_exact(got, ref, f"{kind} {what}", values)


# ------------------------------------------------------------------------------ references


def test_references_follow_formats_on_known_values():
    """Hand-checkable rows: the references are formats.quantize_atom_activation of the values."""
    k, group_size, n_outliers = 576, 64, 128
    x = np.zeros((2, k), np.float16)
    x[0, :64] = np.linspace(-7, 7, 64)  # group 0 absmax 7: scale = fp16(7 * 0.9 / 7) = fp16(0.9)
    x[0, -1] = 127  # outlier absmax 127: scale 1, code 127
    index = np.arange(k, dtype=np.int32)
    ref = qk.reorder_quantize_ref(x, index, group_size, n_outliers, CLIP)
    assert ref.s4[0, 0] == np.float16(0.9) and ref.s8[0, 0] == np.float16(1.0)
    assert ref.q8[0, -1] == 127 and (ref.q8[1] == 0).all() and (ref.s4[1] == 0).all()
    codes = unpack_int4(ref.q4)
    assert codes[0, 0] == -8 and codes[0, 63] == 7  # -7/0.9 -> -7.78 -> -8: clip < 1 uses -8
    np.testing.assert_array_equal(ref.dequantize()[1], 0)


def test_rmsnorm_ref_lane_order_is_a_float32_sum(rng):
    """The lane-ordered sum of squares is an accurate float32 sum of the squares."""
    x = (rng.standard_normal((64, 4096)) * 3).astype(np.float16)
    w = np.ones(4096, np.float16)
    y = qk.rmsnorm_ref(x, w, EPS)
    x64 = x.astype(np.float64)
    exact = x64 / np.sqrt((x64 ** 2).mean(axis=1, keepdims=True) + np.float32(EPS))
    np.testing.assert_allclose(y, exact, rtol=2e-6)


def test_silu_ref_has_no_nan_at_the_fp16_extremes():
    gate_up = np.array([[-65504, 65504, -100, 0, 1, 1, 1, 1]], np.float16)
    y = qk.silu_mul_ref(gate_up)
    assert np.isfinite(y).all()
    np.testing.assert_array_equal(y[0, :2], [0, 65504])


def test_int4_code_bound_covers_subnormal_scales(rng):
    """The CUDA kernels round INT4 codes by the 1.5 * 2**23 add (exact up to 2**22) before clamping
    them; `_int4_code_bound` must bound |value * recip| for every group absmax, float16-subnormal
    scales included (where rounding the scale loses up to a third of it)."""
    for clip in (0.9, 0.5, 0.01):
        c4 = np.float32(clip / 7)
        # absmax * c4 from 0.5 to 64 float16 subnormal steps, and a spread of normal values.
        amax = np.concatenate([np.linspace(0.5, 64, 20000) * 2.0**-24 / c4,
                               np.exp(rng.uniform(-20, 10, 20000))]).astype(np.float32)
        scale = (amax * c4).astype(np.float16).astype(np.float32)
        ok = scale > 0
        recip = np.float32(1) / scale[ok]
        worst = np.max(amax[ok] * recip)
        assert worst <= qk._int4_code_bound(clip), (clip, worst)
    assert qk._int4_code_bound(0.9) < 12
    qk.reorder_quantize(4096, 128, 128, 1e-5, "cuda")
    with pytest.raises(UserError, match="clip ratio 1e-06"):
        qk.reorder_quantize(4096, 128, 128, 1e-6, "cuda")


@pytest.mark.parametrize("message,make", [
    ("multiple of group size", lambda: qk.reorder_quantize(4096, 128, 100, CLIP)),
    ("group size 96", lambda: qk.silu_mul_quantize(4096, 96, 128, CLIP)),
    ("clip", lambda: qk.reorder_quantize(4096, 128, 128, 1.5)),
    ("eps", lambda: qk.rmsnorm_reorder_quantize(4096, 128, 128, CLIP, 0.0)),
    ("variant", lambda: qk.reorder_quantize(4096, 128, 128, CLIP, "rocm")),
    # The masked layout's INT4 part is all `width` input channels; its outliers are some of them.
    ("4160 is not a multiple of group size 128; use --group-size 64",
     lambda: qk.outlier_mask_quantize(4160, 128, 128, CLIP)),
    ("outliers moved to the end", lambda: qk.outlier_mask_quantize(4100, 64, 128, CLIP)),
    ("between 0 and 576", lambda: qk.outlier_mask_quantize(576, 64, 600, CLIP)),
    ("--n-outliers 104", lambda: qk.outlier_mask_quantize(4096, 128, 100, CLIP)),
    ("group size 96", lambda: qk.outlier_mask_quantize(4096, 96, 128, CLIP)),
    ("clip", lambda: qk.outlier_mask_quantize(4096, 128, 128, 0.0)),
    ("clip ratio 1e-06", lambda: qk.outlier_mask_quantize(4096, 128, 128, 1e-6, "cuda")),
])
def test_generators_refuse_bad_shapes(message, make):
    with pytest.raises(UserError, match=message):
        make()


# ------------------------------------------------------------------------------ CPU builds


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k,group_size,n_outliers", SHAPES + EXTRA_SHAPES)
def test_cpu_kernel_matches_reference(kind, k, group_size, n_outliers, rng):
    dev = tvm.cpu()
    exe = None
    rows_list = ROWS if (k, group_size, n_outliers) in SHAPES else (5,)
    for rows in rows_list:
        inputs = make_inputs(kind, rows, k, group_size, n_outliers, rng)
        func, args, ref, values = kernel_and_ref(kind, k, group_size, n_outliers, "cpu", inputs)
        if exe is None:  # one build per shape: M is dynamic
            exe = qk.build(func, "cpu")
        got = run(exe, func, args, rows, layout_channels(kind, k, n_outliers), group_size,
                  n_outliers, dev)
        check(kind, got, ref, values, group_size, n_outliers)


@pytest.mark.parametrize("variant", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_masked_outlier_channel_stays_out_of_its_group(variant, rng):
    """Whatever an outlier channel holds, its INT4 group quantizes as if it were 0: the kernel
    selects 0 there rather than multiplying by 0, which would turn inf into NaN."""
    k, group_size, n_outliers = 576, 64, 128
    poisons = (np.inf, -np.inf, np.nan, 65504)
    inputs = make_inputs("masked", 1 + len(poisons), k, group_size, n_outliers, rng)
    x, channel = inputs["x"], inputs["outliers"][0]
    x[1:] = x[0]
    x[0, channel] = 0
    x[1:, channel] = poisons
    dev, archs = (tvm.cpu(), ()) if variant == "cpu" else (tvm.cuda(0), (_gpu_arch(),))
    func = qk.outlier_mask_quantize(k, group_size, n_outliers, CLIP, variant)
    exe = qk.build(func, variant, archs)
    q4, s4, _, _ = run(exe, func, [x, inputs["outliers"], inputs["outlier_mask"]], len(x),
                       k + n_outliers, group_size, n_outliers, dev)
    group = channel // group_size
    assert s4[0, group] > 0  # the group has other values: the comparison is not of zeros
    for r, poison in enumerate(poisons, 1):
        np.testing.assert_array_equal(q4[r], q4[0], err_msg=f"q4 with {poison}")
        np.testing.assert_array_equal(s4[r], s4[0], err_msg=f"s4 with {poison}")


def test_assert_close_catches_a_wrong_code(rng):
    """The tolerant check is not vacuous: one flipped code away from a tie fails it."""
    inputs = make_inputs("silu", 4, 576, 64, 128, rng)
    _, _, ref, values = kernel_and_ref("silu", 576, 64, 128, "cpu", inputs)
    got = [ref.q4.copy(), ref.s4, ref.q8.copy(), ref.s8]
    assert_close(got, ref, values, 64, 128)
    got[2][0, 5] += 2
    with pytest.raises(AssertionError, match="q8"):
        assert_close(got, ref, values, 64, 128)


# ------------------------------------------------------------------------------ CUDA layout


@pytest.mark.parametrize("slots", (2, 4, 8))
def test_staged_words_are_a_conflict_free_permutation(slots):
    """The reordering CUDA kernels' shared-memory layout: every 8-channel chunk's words are a
    permutation of the chunk, and the 16-byte staging stores of a quarter-warp (8 lanes with
    consecutive chunks, same piece) fall into 8 different 16-byte bank groups."""
    k = 4096
    channels = np.arange(k)
    words = qk.swizzled_word(channels, slots)
    np.testing.assert_array_equal(np.sort(words.reshape(-1, 8), axis=1), channels.reshape(-1, 8))
    per_piece = 8 // slots
    for piece in range(slots):
        starts = qk.swizzled_word(channels[::8] + piece * per_piece, slots)
        assert (starts % per_piece == 0).all()  # 16-byte aligned
        bank_groups = (starts * 2 * slots // 16 % 8).reshape(-1, 8)
        assert (np.sort(bank_groups, axis=1) == np.arange(8)).all(), f"piece {piece}"


# ------------------------------------------------------------------------------ CUDA builds


def test_cuda_kernels_compile_for_sm80_and_sm90a(tmp_path):
    """All five CUDA kernels (H = 4096, G = 128) in one module, one nvcc run, SASS per arch."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed (CUDA toolkit needed to build --target cuda)")
    if cuda_build.find_cuobjdump() is None:
        pytest.skip("cuobjdump not installed (pip install nvidia-cuda-cuobjdump)")
    funcs = [
        qk.rmsnorm_quantize(4096, 128, 128, CLIP, EPS, "cuda"),
        qk.rmsnorm_reorder_quantize(4096, 128, 128, CLIP, EPS, "cuda"),
        qk.silu_mul_quantize(11008, 128, 128, CLIP, "cuda"),
        qk.reorder_quantize(4096, 128, 128, CLIP, "cuda"),
        qk.outlier_mask_quantize(4096, 128, 128, CLIP, "cuda"),
    ]
    mod = tvm.IRModule({f.attrs["global_symbol"]: f for f in funcs})
    exe = qk.build(mod, "cuda", ("sm_80", "sm_90a"))
    lib = tmp_path / "quantize_kernels.so"
    exe.export_library(str(lib))
    codes = cuda_build.list_cuda_codes(lib)
    assert codes["sass"] == ["sm_80", "sm_90a"] and codes["ptx"] == ["sm_80"]
    data = lib.read_bytes()
    for f in funcs:
        assert f"{f.attrs['global_symbol']}_kernel".encode() in data


# ------------------------------------------------------------------------------ GPU runs


def _gpu_arch() -> str:
    major, minor = tvm.cuda(0).compute_version.split(".")
    arch = f"sm_{major}{minor}"
    return "sm_90a" if arch == "sm_90" else arch


@pytest.mark.gpu
@pytest.mark.parametrize("k,group_size,n_outliers", SHAPES + [(14336, 128, 128)] + EXTRA_SHAPES)
def test_gpu_kernels_match_reference(k, group_size, n_outliers, rng):
    """CUDA variants on the GPU: all bit-exact but silu, which is within the exp tolerance."""
    dev = tvm.cuda(0)
    funcs = {
        "rmsnorm": qk.rmsnorm_reorder_quantize(k, group_size, n_outliers, CLIP, EPS, "cuda"),
        "rmsnorm_inorder": qk.rmsnorm_quantize(k, group_size, n_outliers, CLIP, EPS, "cuda"),
        "silu": qk.silu_mul_quantize(k, group_size, n_outliers, CLIP, "cuda"),
        "reorder": qk.reorder_quantize(k, group_size, n_outliers, CLIP, "cuda"),
        "masked": qk.outlier_mask_quantize(k, group_size, n_outliers, CLIP, "cuda"),
    }
    # One module, one nvcc run for the kernels of this shape.
    exe = qk.build(tvm.IRModule({f.attrs["global_symbol"]: f for f in funcs.values()}), "cuda",
                   (_gpu_arch(),))
    failures = []  # every kind and size is checked before failing, to see the whole picture
    for rows in ROWS + (2500,):  # 2500: thousands of blocks in flight
        for kind in KINDS:
            inputs = make_inputs(kind, rows, k, group_size, n_outliers, rng)
            func, args, ref, values = kernel_and_ref(kind, k, group_size, n_outliers, "cuda", inputs)
            got = run(exe, func, args, rows, layout_channels(kind, k, n_outliers), group_size,
                      n_outliers, dev)
            try:
                check(kind, got, ref, values, group_size, n_outliers, f"rows={rows}")
            except AssertionError as err:
                failures.append(str(err).split("\nassert")[0])
    assert not failures, "\n".join(failures)
