"""The W4A4 GEMM: numpy reference, the bit-exact CPU twin, CUDA builds, and the GPU variants.

Inputs are fresh random codes over the full INT4/INT8 ranges (the seed is in every failure
message), so each run tries new data. The CPU tests compile each (N, K, G, O, residual) once and
run it at several M (M is dynamic).
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tvm

from atom_tvm import cuda_build

from atom_tvm.errors import UserError
from atom_tvm.quantization.formats import (
    dequantize_sym,
    quantize_atom_activation,
    quantize_atom_weight,
    unpack_int4,
)
from tir_kernels.gemm_common import KernelSpec, build_kernel, build_kernels
from tir_kernels.w4a4_gemm import (
    LINEAR_TIERS,
    W4A4Shape,
    atom_args,
    reference_from_atom,
    linear_tiers,
    variant_for,
    w4a4_gemm,
    w4a4_gemm_reference,
)

LLVM = tvm.target.Target({"kind": "llvm"})

# (N, K, G): SmolLM2-135M (hidden 576, MLP 1536, G=64) and Llama-2-7B (4096, 11008, G=128).
SMOLLM2 = [(576, 576, 64), (1536, 576, 64), (576, 1536, 64)]
LLAMA2_7B = [(4096, 4096, 128), (11008, 4096, 128), (4096, 11008, 128)]


def random_operands(seed: int, M: int, shape: W4A4Shape, residual: bool) -> list[np.ndarray]:
    """Kernel inputs with every code value reachable (INT4 -8..7, INT8 -128..127) and scales of
    both signs, sized so that outputs stay well inside float16."""
    rng = np.random.default_rng(seed)

    def operand(rows):
        q4 = rng.integers(0, 256, (rows, shape.packed), dtype=np.uint8)
        s4 = (rng.uniform(0.002, 0.02, (rows, shape.groups)) * rng.choice([-1, 1], (rows, shape.groups)))
        q8 = rng.integers(-128, 128, (rows, shape.O), dtype=np.int8)
        s8 = rng.uniform(0.0005, 0.004, (rows, 1)) * (shape.O > 0)
        return [q4, s4.astype(np.float16), q8, s8.astype(np.float16)]

    args = operand(M) + operand(shape.N)
    if residual:
        args.append(rng.standard_normal((M, shape.N)).astype(np.float16))
    return args


def reference(args, shape: W4A4Shape, residual: bool, fused: bool = False) -> np.ndarray:
    return w4a4_gemm_reference(*args[:8], shape.G, args[8] if residual else None, fused=fused)


def assert_bit_exact(out: np.ndarray, ref: np.ndarray, what: str) -> None:
    bad = out.view(np.uint16) != ref.view(np.uint16)
    if bad.any():
        where = np.argwhere(bad)
        i = tuple(where[0])
        raise AssertionError(
            f"{what}: {bad.sum()} of {bad.size} differ, first at {i}: {out[i]} != {ref[i]}; "
            f"rows mod 16 {sorted(set(where[:, 0] % 16))}, columns mod 8 {sorted(set(where[:, 1] % 8))}")


@functools.lru_cache(maxsize=None)
def cpu_kernel(shape: W4A4Shape, residual: bool):
    return tvm.compile(w4a4_gemm(LLVM, shape.N, shape.K, shape.G, shape.O, residual), LLVM)


def run_cpu(shape: W4A4Shape, residual: bool, args) -> np.ndarray:
    dev = tvm.cpu()
    y = tvm.runtime.tensor(np.zeros((args[0].shape[0], shape.N), np.float16), dev)
    cpu_kernel(shape, residual)(*[tvm.runtime.tensor(a, dev) for a in args], y)
    return y.numpy()


def fresh_seed() -> int:
    return int(np.random.SeedSequence().entropy % (1 << 63))


# ---------------------------------------------------------------------------------------------
# The reference
# ---------------------------------------------------------------------------------------------


def test_reference_is_the_dequantized_product():
    """On quantized real-valued data the reference is the float product of the dequantized
    operands up to float32 summation error and the final float16 rounding."""
    rng = np.random.default_rng(fresh_seed())
    G, O = 64, 128
    a = quantize_atom_activation(rng.standard_normal((9, 576)).astype(np.float32), G, O)
    w = quantize_atom_weight(rng.standard_normal((192, 576)).astype(np.float32) * 0.05, G, O)
    exact = a.dequantize().astype(np.float64) @ w.dequantize().astype(np.float64).T
    out = reference_from_atom(a, w).astype(np.float64)
    np.testing.assert_allclose(out, exact, rtol=2e-3, atol=2e-3)


def test_reference_order_per_element():
    """The vectorized reference equals the documented loop, written out element by element."""
    shape = W4A4Shape(N=64, K=256, G=64, O=128)
    args = random_operands(fresh_seed(), 3, shape, residual=True)
    a_q4, a_s4, a_q8, a_s8, w_q4, w_s4, w_q8, w_s8, res = args
    qa, qw = unpack_int4(a_q4).astype(np.int64), unpack_int4(w_q4).astype(np.int64)
    want = np.zeros((3, 64), np.float16)
    for m in range(3):
        for n in range(64):
            acc = np.float32(0)
            for g in range(shape.groups):
                isum = int(qa[m, g * 64 : (g + 1) * 64] @ qw[n, g * 64 : (g + 1) * 64])
                acc = np.float32(acc + np.float32(isum) * (np.float32(a_s4[m, g]) * np.float32(w_s4[n, g])))
            isum = int(a_q8[m].astype(np.int64) @ w_q8[n].astype(np.int64))
            acc = np.float32(acc + np.float32(isum) * (np.float32(a_s8[m, 0]) * np.float32(w_s8[n, 0])))
            want[m, n] = np.float16(np.float32(acc + np.float32(res[m, n])))
    assert_bit_exact(reference(args, shape, True), want, "reference vs loop")


def test_fused_reference_rounds_once():
    """The fused reference's fma(x, s, acc) is the exactly rounded x * s + acc, including sums
    that land on a float32 midpoint in float64 (where rounding twice would go wrong)."""
    from fractions import Fraction

    from tir_kernels.w4a4_gemm import _fma32

    rng = np.random.default_rng(seed := fresh_seed())
    x = rng.integers(-5000, 5000, 3000).astype(np.float32)
    s = (rng.standard_normal(3000) * 1e-4).astype(np.float32)
    acc = rng.standard_normal(3000).astype(np.float32)
    acc[:1000] = -(x[:1000].astype(np.float64) * s[:1000]).astype(np.float32)  # cancellation
    # 1 + 2^-23 + x s with x s = 2^-24 (1 - 2^-46): a midpoint in float64, just below it exactly.
    x[-1], s[-1], acc[-1] = (1 + 2**-23) * 2**-12, (1 - 2**-23) * 2**-12, 1 + 2**-23
    got = _fma32(x, s, acc)
    for i in range(x.size):
        exact = Fraction(float(x[i])) * Fraction(float(s[i])) + Fraction(float(acc[i]))
        near = np.float32(float(exact))
        candidates = (np.nextafter(near, np.float32(-np.inf)), near, np.nextafter(near, np.float32(np.inf)))
        want = min(candidates, key=lambda c: (abs(Fraction(float(c)) - exact), int(np.array(c).view(np.uint32)) & 1))
        assert got[i] == want, f"seed={seed} i={i}: {got[i]!r} != {want!r}"
    assert got[-1] == np.float32(1 + 2**-23)


def test_dequantize_sym_agrees_with_unpacked_codes():
    """The GEMM reads the packed codes that formats.py writes (low nibble = even k)."""
    rng = np.random.default_rng(fresh_seed())
    w = quantize_atom_weight(rng.standard_normal((8, 256)).astype(np.float32), 64, 0)
    np.testing.assert_array_equal(w.dequantize(), dequantize_sym(unpack_int4(w.q4), w.s4, 64))


# ---------------------------------------------------------------------------------------------
# cpu: bit-exact twin
# ---------------------------------------------------------------------------------------------


def _cpu_cases():
    for N, K, G in SMOLLM2:
        for O in (0, 128):
            yield pytest.param(W4A4Shape(N, K, G, O), (1, 7, 16, 128, 1000), O == 128,
                               id=f"smollm2-N{N}-K{K}-G{G}-O{O}")
    for N, K, G in LLAMA2_7B:
        for O in (0, 128):
            yield pytest.param(W4A4Shape(N, K, G, O), (1, 7, 16), O == 0,
                               id=f"llama2-N{N}-K{K}-G{G}-O{O}")


@pytest.mark.parametrize("shape, rows, residual", list(_cpu_cases()))
def test_cpu_bit_exact(shape, rows, residual):
    for M in rows:
        seed = fresh_seed()
        args = random_operands(seed, M, shape, residual)
        out = run_cpu(shape, residual, args)
        assert_bit_exact(out, reference(args, shape, residual), f"cpu M={M} {shape} seed={seed}")


def test_cpu_quantized_real_data():
    """Through the formats' quantizers (clipped, realistic magnitudes) with a residual."""
    rng = np.random.default_rng(seed := fresh_seed())
    G, O = 128, 128
    a = quantize_atom_activation(rng.standard_normal((33, 1024)).astype(np.float32) * 3, G, O, clip=0.9)
    w = quantize_atom_weight(rng.standard_normal((256, 1024)).astype(np.float32) * 0.02, G, O, clip=0.85)
    res = rng.standard_normal((33, 256)).astype(np.float16)
    out = run_cpu(W4A4Shape(256, 1024, G, O), True, [*atom_args(a, w), res])
    assert_bit_exact(out, reference_from_atom(a, w, res), f"cpu quantized seed={seed}")


def test_cpu_extremes():
    """Largest products (-8 * -8 over a whole group, -128 * -128 outliers), all-outlier and
    all-INT4 splits, zero scales, and float16 overflow to inf, all matched bit for bit."""
    seed = fresh_seed()
    for shape in (W4A4Shape(128, 256, 128, 128), W4A4Shape(64, 128, 64, 128), W4A4Shape(64, 128, 64, 0)):
        args = random_operands(seed, 5, shape, residual=False)
        args[0][:2], args[4][:3] = 0x88, 0x88  # every code -8
        args[2][:2], args[6][:3] = -128, -128
        args[1][0], args[3][0] = 0, 0  # row 0: zero scales
        args[1][1], args[5][1] = 60000, 60000  # row 1 x column 1: beyond float16
        assert_bit_exact(run_cpu(shape, False, args), reference(args, shape, False), f"{shape} seed={seed}")


# ---------------------------------------------------------------------------------------------
# Shapes and dispatch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "N, K, G, O, hint",
    [(576, 576, 32, 128, "use 64 or 128"), (100, 576, 64, 128, "multiple of the group size 64"),
     (576, 600, 64, 128, "K - O"), (576, 576, 64, 640, "K - O")],
)
def test_bad_shapes_are_user_errors(N, K, G, O, hint):
    with pytest.raises(UserError, match=hint):
        w4a4_gemm(LLVM, N, K, G, O)


def test_variant_dispatch():
    cuda = lambda arch: tvm.target.Target({"kind": "cuda", "arch": arch})  # noqa: E731
    assert variant_for(LLVM) == "cpu"
    assert [variant_for(cuda(a)) for a in ("sm_80", "sm_86", "sm_89")] == ["sm80_int4"] * 3
    assert [variant_for(cuda(a)) for a in ("sm_90", "sm_90a")] == ["sm90_int8", "sm90_wgmma"]
    with pytest.raises(UserError, match="sm_90a"):
        variant_for(cuda("sm_75"))


@pytest.mark.parametrize("variant", ["sm90_wgmma", "sm90_int8", "sm80_int4"])
@pytest.mark.parametrize("N", [256, 576, 4096, 5120, 11008, 15360, 17408, 22016, 27648])
def test_linear_tiers_cover_every_m_once(variant, N):
    """`w4a4_linear`'s switches rise strictly, the gemv takes decode (M <= 16) on every weight, the
    last kernel is the variant's tiled one for any larger M, and each tier's grid at its largest M
    stays within its budget (`LINEAR_TIERS`)."""
    tiers = linear_tiers(variant, N)
    switches = [m for m, _ in tiers[:-1]]
    assert tiers[-1][0] is None and tiers[-1][1].name == variant
    assert tiers[0][1].name == "gemv" and switches[0] >= 16
    assert switches == sorted(set(switches))
    budget = {name: (blocks, rows) for name, blocks, rows in LINEAR_TIERS[variant]}
    for m, cfg in tiers[1:-1]:
        blocks, rows = budget[cfg.name]
        assert -(-m // cfg.block_m) * -(-N // cfg.block_n) <= blocks and m <= (rows or m)


def test_linear_tiers_follow_the_h100_probe():
    """The switch points docs/bench/gemm.md reports for the probed shapes."""
    def names(N):
        return [(m, cfg.name) for m, cfg in linear_tiers("sm90_wgmma", N)]

    assert names(4096) == [(64, "gemv"), (256, "sm90_wgmma_64"), (None, "sm90_wgmma")]
    assert names(11008) == [(16, "gemv"), (64, "sm90_wgmma_64"), (None, "sm90_wgmma")]
    assert names(27648) == [(16, "gemv"), (64, "sm90_wgmma_64x128"), (None, "sm90_wgmma")]
    assert [m for m, _ in linear_tiers("sm80_int4", 4096)] == [128, None]


# ---------------------------------------------------------------------------------------------
# CUDA builds (no GPU needed): every variant compiles, with the instructions it is meant to use
# ---------------------------------------------------------------------------------------------


def find_nvdisasm() -> str | None:
    """nvdisasm (which cuobjdump --dump-sass runs) from PATH or the nvidia-cuda-nvdisasm wheel."""
    if shutil.which("nvdisasm"):
        return shutil.which("nvdisasm")
    try:
        files = importlib.metadata.files("nvidia-cuda-nvdisasm") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    found = [Path(f.locate()) for f in files if f.name == "nvdisasm"]
    return str(found[0]) if found else None


def sass_of(lib: Path, arch: str) -> str:
    """The SASS for ``arch`` of every fatbin in an exported library."""
    nvdisasm = find_nvdisasm()
    if nvdisasm is None:
        pytest.skip("nvdisasm not installed (pip install nvidia-cuda-nvdisasm) to read SASS")
    env = {**os.environ, "PATH": f"{Path(nvdisasm).parent}{os.pathsep}{os.environ['PATH']}"}
    text = []
    for i, fatbin in enumerate(cuda_build.find_fatbins(lib.read_bytes())):
        blob = lib.parent / f"{lib.stem}.{i}.fatbin"
        blob.write_bytes(fatbin)
        proc = subprocess.run([cuda_build.find_cuobjdump(), "--dump-sass", "--gpu-architecture", arch, str(blob)],
                              capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr
        text.append(proc.stdout)
    return "\n".join(text)


@pytest.mark.parametrize(
    "kind, archs, int4_mma, int8_mma",
    [("gemm", ("sm_80", "sm_89"), 16, "IMMA.16832.S8.S8"), ("gemm", ("sm_90",), 0, "IMMA.16832.S8.S8"),
     ("gemm", ("sm_90a",), 0, "IGMMA.64x128x32.S8.S8"), ("gemv", ("sm_90a",), 0, "IMMA.16832.S8.S8"),
     ("linear", ("sm_90a",), 0, "IGMMA.64x128x32.S8.S8")],
    ids=["sm80_int4", "sm90_int8", "sm90_wgmma", "gemv", "linear"],
)
def test_cuda_variant_builds(cuda_toolchain, tmp_path, kind, archs, int4_mma, int8_mma):
    """Each variant compiles to SASS for its archs. sm80_int4 runs the INT4 groups on the native
    IMMA.16864.S4 (16 per step: a 64x32 warp tile) and only the outliers on INT8 IMMA; Hopper
    never touches the emulated INT4 IMMA (sm_90a: warpgroup IGMMA, sm_90: mma.sync IMMA). The
    tiled kernels convert group sums through the float-magic FADD; the gemv's float chain is a
    few I2F per output and piece, and stays. The linear function holds the gemv and both wgmma
    tilings. No variant spills to local memory."""
    spec = KernelSpec(kind, archs, 576, 1536, 64, 128, True)
    lib = Path(build_kernel(spec, str(tmp_path)))
    assert cuda_build.list_cuda_codes(lib) == {"sass": list(archs), "ptx": [archs[0]]}
    sass = sass_of(lib, archs[0])
    assert sass.count("IMMA.16864.S4.S4") == int4_mma
    assert int8_mma in sass
    assert "LDL" not in sass and "STL" not in sass
    if kind == "gemm":
        assert "I2F" not in sass
    if kind == "linear":  # on N = 576: the gemv, 64x64 and 128x128 wgmma blocks
        assert "IMMA.16832.S8.S8" in sass and "IGMMA.64x64x32.S8.S8" in sass


# ---------------------------------------------------------------------------------------------
# GPU: every CUDA variant against the reference
# ---------------------------------------------------------------------------------------------

_ROWS = {"gemm": (1, 7, 16, 33, 128, 1000), "gemv": (1, 2, 7, 16)}


def _linear_rows(N: int) -> tuple[int, ...]:
    """Every kernel of the sm_90a `w4a4_linear`: 1 and 7 rows, and either side of each switch."""
    switches = [max_m for max_m, _ in linear_tiers("sm90_wgmma", N) if max_m is not None]
    return 1, 7, *[m + d for m in switches for d in (0, 1)]


def _gpu_cases():
    for kind, archs in (("gemm", ("sm_90a",)), ("gemm", ("sm_90",)), ("gemm", ("sm_80", "sm_90a")),
                        ("gemv", ("sm_90a",)), ("linear", ("sm_90a",))):
        for (N, K, G), big in [(nkg, False) for nkg in SMOLLM2] + [(nkg, True) for nkg in LLAMA2_7B]:
            for O in (0, 128):
                if archs == ("sm_90",) and (N, K, O) not in ((576, 1536, 128), (4096, 11008, 0)):
                    continue  # plain sm_90 (mma.sync) shares all but the tensor step with sm_80: two shapes
                if kind == "linear":
                    rows = _linear_rows(N)
                else:
                    rows = (1, 16, 128) if big and kind == "gemm" else _ROWS[kind]
                yield KernelSpec(kind, archs, N, K, G, O, residual=O == 128), rows
        # 256 outliers: sums up to exactly 2^22 (the magic conversion's edge); 384: the I2F path.
        for O in (256, 384):
            yield (KernelSpec(kind, archs, 256, 640 if O == 256 else 768, 128, O, residual=True),
                   _linear_rows(256) if kind == "linear" else _ROWS[kind])
    # A weight wide enough for the 64x128 tier (a fused gate/up's N, a short K).
    yield KernelSpec("linear", ("sm_90a",), 17408, 384, 128, 128, residual=True), _linear_rows(17408)


GPU_CASES = list(_gpu_cases())


@pytest.fixture(scope="session")
def gpu_libraries(tmp_path_factory):
    """All GPU test kernels, built once, in parallel."""
    out = tmp_path_factory.mktemp("w4a4-cuda")
    cuda_build.enable_cuda_codegen()
    return build_kernels([spec for spec, _ in GPU_CASES], str(out))


@pytest.mark.gpu
@pytest.mark.parametrize("spec, rows", GPU_CASES, ids=[s.file_name()[5:-3] for s, _ in GPU_CASES])
def test_cuda_variant_matches_reference(gpu_libraries, spec, rows):
    """Bit-exact to the reference with each acc + p * s fused into one FMA, as nvcc contracts it.
    (Against the unfused reference that is one float16 ulp almost everywhere, but not a bound:
    where a sum cancels, the float32 rounding the FMA skips can show as 2 ulp.)"""
    dev = tvm.cuda(0)
    func = tvm.runtime.load_module(gpu_libraries[spec])[spec.function_name()]
    shape = W4A4Shape(spec.N, spec.K, spec.G, spec.O)
    for M in rows:
        seed = fresh_seed()
        args = random_operands(seed, M, shape, spec.residual)
        y = tvm.runtime.tensor(np.zeros((M, spec.N), np.float16), dev)
        func(*[tvm.runtime.tensor(a, dev) for a in args], y)
        out = y.numpy()
        what = f"{spec.function_name()} M={M} {shape} seed={seed}"
        assert_bit_exact(out, reference(args, shape, spec.residual, fused=True), what)
