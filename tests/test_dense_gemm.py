"""The dense baselines' GEMMs (fp16 x fp16, int8 x int8): references, the CPU twin, CUDA builds,
and the GPU variants. fp16 is checked against the exact product within `fp16_tolerance` (no float
order is fixed), int8 bit for bit. Fresh random data each run; the seed is in every message.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import tvm

from atom_tvm import cuda_build
from atom_tvm.errors import UserError
from test_w4a4_gemm import assert_bit_exact, fresh_seed, sass_of
from tir_kernels.dense_gemm import (
    DenseSpec,
    build_dense_kernel,
    fp16_gemm,
    fp16_gemm_reference,
    fp16_tolerance,
    int8_gemm,
    int8_gemm_reference,
    variant_for,
)
from tir_kernels.gemm_common import build_kernels

LLVM = tvm.target.Target({"kind": "llvm"})
#: Relative L2 error allowed for fp16 (the float16 rounding alone is about 3e-4).
FP16_REL_L2 = 1e-3


def operands(op: str, seed: int, M: int, N: int, K: int, residual: bool) -> list[np.ndarray]:
    """fp16: x ~ N(0, 1), w ~ N(0, 0.02^2), as activations and weights are; int8: codes over the
    full range (-128 included) and positive scales, so outputs stay well inside float16."""
    rng = np.random.default_rng(seed)
    if op == "fp16":
        args = [rng.standard_normal((M, K)).astype(np.float16),
                (rng.standard_normal((N, K)) * 0.02).astype(np.float16)]
    else:
        args = [rng.integers(-128, 128, (M, K), dtype=np.int8),
                rng.uniform(0.002, 0.02, (M, 1)).astype(np.float16),
                rng.integers(-128, 128, (N, K), dtype=np.int8),
                (rng.uniform(0.0005, 0.004, (N, 1)) / np.sqrt(K)).astype(np.float16)]
    if residual:
        args.append(rng.standard_normal((M, N)).astype(np.float16))
    return args


def check(op: str, out: np.ndarray, args, residual: bool, what: str) -> None:
    """fp16: within the per-element bound and the relative L2 bound; int8: bit-exact."""
    if op == "int8":
        assert_bit_exact(out, int8_gemm_reference(*args[:4], args[4] if residual else None), what)
        return
    x, w = args[0], args[1]
    ref = fp16_gemm_reference(x, w, args[2] if residual else None)
    exact = x.astype(np.float64) @ w.astype(np.float64).T + (args[2].astype(np.float64) if residual else 0)
    err = np.abs(out.astype(np.float64) - ref)
    bound = fp16_tolerance(x, w, ref)
    assert np.isfinite(out).all(), f"{what}: non-finite outputs"
    worst = np.unravel_index(np.argmax(err / bound), err.shape)
    assert (err <= bound).all(), f"{what}: {(err > bound).sum()} outside the bound, worst {worst}: " \
                                 f"{out[worst]} vs {ref[worst]} (bound {bound[worst]:.3g})"
    rel = np.linalg.norm(out.astype(np.float64) - exact) / np.linalg.norm(exact)
    assert rel < FP16_REL_L2, f"{what}: relative L2 error {rel:.3g}"


# ---------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------


def test_int8_reference_order_per_element():
    """The vectorized int8 reference equals the documented order, element by element."""
    args = operands("int8", seed := fresh_seed(), 3, 16, 320, residual=True)
    x, sx, w, sw, res = args
    want = np.zeros((3, 16), np.float16)
    for m in range(3):
        for n in range(16):
            acc = int(x[m].astype(np.int64) @ w[n].astype(np.int64))
            p = np.float32(np.float32(acc) * np.float32(np.float32(sx[m, 0]) * np.float32(sw[n, 0])))
            want[m, n] = np.float16(np.float32(p + np.float32(res[m, n])))
    assert_bit_exact(int8_gemm_reference(*args), want, f"reference vs loop seed={seed}")


def test_fp16_reference_and_bound():
    """The fp16 reference is the float64 product rounded once; a float32 sum in plain order sits
    within the bound, and an error of a few ulps on a typical output does not."""
    x, w = operands("fp16", seed := fresh_seed(), 5, 32, 1536, residual=False)
    ref = fp16_gemm_reference(x, w)
    np.testing.assert_array_equal(ref, (x.astype(np.float64) @ w.astype(np.float64).T).astype(np.float16))
    f32 = np.zeros((5, 32), np.float32)
    for k in range(x.shape[1]):
        f32 += x[:, k, None].astype(np.float32) * w[None, :, k].astype(np.float32)
    check("fp16", f32.astype(np.float16), [x, w], False, f"sequential float32 seed={seed}")
    bad = ref.copy()
    bad[0, 0] = ref[0, 0] + np.float16(0.05)  # about 20-50 ulps of a typical |y| ~ 1
    with pytest.raises(AssertionError):
        check("fp16", bad, [x, w], False, "perturbed")


# ---------------------------------------------------------------------------------------------
# cpu
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def cpu_kernel(op: str, N: int, K: int, residual: bool):
    make = fp16_gemm if op == "fp16" else int8_gemm
    return tvm.compile(make(LLVM, N, K, residual), LLVM)


def run(func, args, N: int, dev) -> np.ndarray:
    y = tvm.runtime.tensor(np.zeros((args[0].shape[0], N), np.float16), dev)
    func(*[tvm.runtime.tensor(a, dev) for a in args], y)
    return y.numpy()


# (N, K): SmolLM2-135M's q/o, up/gate and down projections, and a Llama-2-7B projection.
CPU_SHAPES = [(576, 576), (1536, 576), (576, 1536), (4096, 4096)]


@pytest.mark.parametrize("op", ["fp16", "int8"])
@pytest.mark.parametrize("N, K", CPU_SHAPES, ids=[f"N{n}-K{k}" for n, k in CPU_SHAPES])
def test_cpu(op, N, K):
    for M, residual in ((1, False), (7, True), (64, False)) if N * K < 1 << 22 else ((1, True), (3, False)):
        args = operands(op, seed := fresh_seed(), M, N, K, residual)
        out = run(cpu_kernel(op, N, K, residual), args, N, tvm.cpu())
        check(op, out, args, residual, f"cpu {op} M={M} N={N} K={K} seed={seed}")


def test_cpu_int8_extremes():
    """-128 x -128 over all of K (the largest |acc|, K 2^14), zero scales, and float16 overflow."""
    N, K = 32, 11008
    args = operands("int8", seed := fresh_seed(), 4, N, K, residual=False)
    args[0][0], args[2][:2] = -128, -128
    args[1][1] = 0
    args[1][2], args[3][3] = 60000, 60000
    out = run(cpu_kernel("int8", N, K, False), args, N, tvm.cpu())
    assert np.isinf(out[2, 3])
    check("int8", out, args, False, f"cpu extremes seed={seed}")


def test_bad_shapes_and_dispatch():
    cuda = lambda arch: tvm.target.Target({"kind": "cuda", "arch": arch})  # noqa: E731
    with pytest.raises(UserError, match="multiple of 16"):
        fp16_gemm(LLVM, 100, 576)
    with pytest.raises(UserError, match="multiple of 64"):
        int8_gemm(cuda("sm_80"), 576, 608)
    assert variant_for(LLVM) == "cpu"
    assert {variant_for(cuda(a)) for a in ("sm_80", "sm_86", "sm_89", "sm_90")} == {"sm80"}
    assert variant_for(cuda("sm_90a")) == "sm90a"
    with pytest.raises(UserError, match="multiple of 16"):
        int8_gemm(cuda("sm_90a"), 576, 600)
    with pytest.raises(UserError, match="sm_90a"):
        variant_for(cuda("sm_75"))


# ---------------------------------------------------------------------------------------------
# CUDA builds (no GPU needed)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op, sass", [("fp16", "HMMA.16816.F32"), ("int8", "IMMA.16832.S8.S8")])
def test_cuda_builds(cuda_toolchain, tmp_path, op, sass):
    """SASS for sm_80 and sm_90a: the step's 16 tensor-core instructions (a 64x32 warp tile of
    16x8 tiles) twice per barrier block, and accumulators in registers (no local memory)."""
    spec = DenseSpec(op, ("sm_80", "sm_90a"), 576, 1536, residual=True)
    lib = Path(build_dense_kernel(spec, str(tmp_path)))
    assert cuda_build.list_cuda_codes(lib) == {"sass": ["sm_80", "sm_90a"], "ptx": ["sm_80"]}
    for arch in ("sm_80", "sm_90a"):
        code = sass_of(lib, arch)
        assert code.count(sass) == 32, f"{arch}: {code.count(sass)} x {sass}"
        assert "STL" not in code and "LDL" not in code, f"{arch}: local memory (spilled accumulators)"


@pytest.mark.parametrize("op, counts", [
    ("fp16", {"HGMMA.64x256x16.F32": 4, "HGMMA.64x128x16.F32": 8}),
    ("int8", {"IGMMA.64x128x32.S8.S8": 16}),
])
def test_cuda_builds_sm90a(cuda_toolchain, tmp_path, op, counts):
    """The sm_90a build is the wgmma kernel in its three row tiers (128x256, 128x128, 64x128
    blocks): per 128-byte step of K, 4 k-slices of m64n256 (fp16) or of two m64n128 (int8, whose
    n256 TVM lacks) in the first, of m64n128 in the others; no mma.sync, no local memory."""
    spec = DenseSpec(op, ("sm_90a",), 576, 1536, residual=True)
    assert spec.tiling() == "sm90a"
    lib = Path(build_dense_kernel(spec, str(tmp_path)))
    code = sass_of(lib, "sm_90a")
    for sass, count in counts.items():
        assert code.count(sass) == count, f"{code.count(sass)} x {sass}"
    assert "HMMA" not in code and "IMMA" not in code
    assert "STL" not in code and "LDL" not in code, "local memory (spilled accumulators)"


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------

GPU_SHAPES = [(576, 576), (1536, 576), (576, 1536), (4096, 4096), (11008, 4096), (4096, 11008)]
GPU_CASES = [DenseSpec(op, archs, N, K, residual)
             for op in ("fp16", "int8") for archs in (("sm_90a",), ("sm_80",))
             for N, K in GPU_SHAPES for residual in (False, True)
             if archs == ("sm_90a",) or (N, K, residual) == (576, 1536, True)]


@pytest.fixture(scope="session")
def gpu_libraries(tmp_path_factory):
    out = tmp_path_factory.mktemp("dense-cuda")
    cuda_build.enable_cuda_codegen()
    return build_kernels(GPU_CASES, str(out), build=build_dense_kernel)


@pytest.mark.gpu
@pytest.mark.parametrize("spec", GPU_CASES, ids=[s.file_name()[:-3] for s in GPU_CASES])
def test_cuda_matches_reference(gpu_libraries, spec):
    dev = tvm.cuda(0)
    func = tvm.runtime.load_module(gpu_libraries[spec])[spec.function_name()]
    for M in (1, 7, 128, 1000) if spec.N * spec.K < 1 << 22 else (1, 130, 1024):
        args = operands(spec.op, seed := fresh_seed(), M, spec.N, spec.K, spec.residual)
        check(spec.op, run(func, args, spec.N, dev), args, spec.residual,
              f"{spec.function_name()} {spec.archs} M={M} N={spec.N} K={spec.K} seed={seed}")
