"""CPUGemm (tir_kernels/cpu_gemm.py): NT matmuls built the way the model builds them (Relax
`matmul(x, permute_dims(w))` + FuseTransposeMatmul + legalize/fuse), scheduled by the rule, compiled
for llvm and checked against numpy in float64 on fresh random inputs."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import tvm
from tvm import relax, te, tirx
from tvm.s_tir import dlight as dl
from tvm.target import Target, codegen

from tir_kernels.cpu_gemm import CPUGemm, VectorUnit

TARGET = Target({"kind": "llvm"})  # what atom_tvm builds for: generic x86-64 (SSE2)
# The CPU running the tests (AVX-512 here): wider vectors, bigger tiles.
HOST = Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})
DYNAMIC = None  # rows given as a symbolic `m`, like seq_len / batch_size in the model
# (N, K): a real SmolLM2 layer shape, a small one, and sizes no vector or tile divides.
SHAPES = [(576, 1536), (64, 48), (100, 37)]
ROWS = [1, 7, 64, 300]


def _linear_module(rows: int | None, n: int, k: int, dtype: str, residual: bool) -> tvm.IRModule:
    """`x @ w.T (+ r)` in Relax, lowered by the passes compile.py runs before scheduling."""
    m = tirx.Var("m", "int64") if rows is None else rows
    x = relax.Var("x", relax.TensorType((1, m, k), dtype))
    w = relax.Var("w", relax.TensorType((n, k), dtype))
    r = relax.Var("r", relax.TensorType((1, m, n), dtype))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w, r] if residual else [x, w]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, relax.op.permute_dims(w)))
            if residual:
                y = bb.emit(relax.op.add(r, y))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return tvm.transform.Sequential([
        relax.transform.FuseTransposeMatmul(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ])(bb.get())


def _matmul_func(mod: tvm.IRModule) -> tirx.PrimFunc:
    (func,) = [f for gv, f in mod.functions_items() if "NT_matmul" in gv.name_hint]
    return func


def _compile(func: tirx.PrimFunc, target: Target = TARGET):
    """Build one PrimFunc on its own (legalized ones are private: give it an exported name)."""
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    return tvm.compile(mod, target)["main"]


@functools.cache
def _kernel(rows: int | None, n: int, k: int, dtype: str = "float32", residual: bool = False,
            host: bool = False):
    """(scheduled PrimFunc, compiled function) for one case; shared by the tests below."""
    target = HOST if host else TARGET
    func = _matmul_func(_linear_module(rows, n, k, dtype, residual))
    sch = CPUGemm().apply(func, target, False)
    assert sch is not None, "CPUGemm did not match the legalized NT matmul"
    scheduled = sch.mod["main"]
    return scheduled, _compile(scheduled, target)


def _run(fn, rows: int, n: int, k: int, dtype: str, residual: bool, seed: int) -> float:
    """Relative L2 error of the kernel against numpy float64 on fresh inputs."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (1, rows, k)).astype(dtype)
    w = rng.uniform(-1, 1, (n, k)).astype(dtype)
    ref = x.astype("float64") @ w.astype("float64").T
    args = [x, w]
    if residual:
        r = rng.uniform(-1, 1, (1, rows, n)).astype(dtype)
        ref = ref + r
        args.append(r)
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.full((1, rows, n), np.nan, dtype), dev)
    fn(*[tvm.runtime.tensor(a, dev) for a in args], out)
    return float(np.linalg.norm(out.numpy().astype("float64") - ref) / np.linalg.norm(ref))


def _is_scheduled(func: tirx.PrimFunc) -> bool:
    """The schedule's marks: a loop spread over the cores and a vectorized one."""
    text = func.script()
    return "T.parallel(" in text and "T.vectorized(" in text


@pytest.mark.parametrize("n,k", SHAPES)
def test_dynamic_rows(n, k):
    """One kernel with a symbolic row count (prefill), run at every row count: GEMM strategy."""
    func, fn = _kernel(DYNAMIC, n, k)
    assert _is_scheduled(func)
    for rows in ROWS:
        assert _run(fn, rows, n, k, "float32", False, seed=rows) < 1e-5, rows


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("n,k", SHAPES)
def test_static_rows(rows, n, k):
    """Static row counts: 1 (decode) takes the GEMV strategy, the others GEMM, with and without
    padding of the rows and of n."""
    func, fn = _kernel(rows, n, k)
    assert _is_scheduled(func)
    assert _run(fn, rows, n, k, "float32", False, seed=1) < 1e-5


@pytest.mark.parametrize("rows", [DYNAMIC, 1, 3])
def test_residual_epilogue(rows):
    """fused_NT_matmul*_add*: the residual add is folded into the matmul's write-back."""
    func, fn = _kernel(rows, 576, 576, residual=True)
    assert _is_scheduled(func)
    if rows is DYNAMIC:  # GEMM: the add happens in the write-back of the accumulator tile
        assert 'T.sblock("T_add")' not in func.script()
    for run_rows in ([1, 7, 130] if rows is DYNAMIC else [rows]):
        assert _run(fn, run_rows, 576, 576, "float32", True, seed=run_rows) < 1e-5, run_rows


@pytest.mark.parametrize("rows", [DYNAMIC, 1])
def test_float16(rows):
    """fp16 in, fp16 out (fp16 accumulation, as the unscheduled kernel): no worse than it."""
    _, fn = _kernel(rows, 64, 48, "float16")
    plain = _compile(_matmul_func(_linear_module(rows, 64, 48, "float16", False)))
    for run_rows in [1, 7] if rows is DYNAMIC else [1]:
        err = _run(fn, run_rows, 64, 48, "float16", False, seed=3)
        assert err < 2 * _run(plain, run_rows, 64, 48, "float16", False, seed=3) + 1e-3


@pytest.mark.parametrize("rows", [DYNAMIC, 1])
@pytest.mark.parametrize("n,k", [(576, 1536), (100, 37)])
def test_host_cpu_target(rows, n, k):
    """With the host's own -mcpu (what a native build would use) the tiles follow its vectors;
    on AVX-512 the GEMM takes the repacked-panel strategy (with n = 100 padded to 128)."""
    _, fn = _kernel(rows, n, k, residual=True, host=True)
    for run_rows in [1, 7, 64] if rows is DYNAMIC else [1]:
        assert _run(fn, run_rows, n, k, "float32", True, seed=5) < 1e-5, run_rows


def test_not_an_nt_matmul():
    """Other functions are left alone: NN layout (w [K, N]), a batched NT matmul (attention
    scores), elementwise ops, and any non-CPU target."""
    rule = CPUGemm()
    x = relax.Var("x", relax.TensorType((4, 8, 16), "float32"))
    w = relax.Var("w", relax.TensorType((16, 32), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.exp(relax.op.matmul(x, w)))
        bb.emit_func_output(out)
    mod = relax.transform.LegalizeOps()(relax.transform.FuseTransposeMatmul()(bb.get()))
    funcs = [f for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]
    q = te.placeholder((4, 8, 16), name="q")
    kv = te.placeholder((4, 32, 16), name="k")
    r = te.reduce_axis((0, 16), name="r")
    scores = te.compute((4, 8, 32), lambda b, i, j: te.sum(q[b, i, r] * kv[b, j, r], axis=r))
    funcs.append(te.create_prim_func([q, kv, scores]))
    assert len(funcs) == 3
    assert all(rule.apply(f, TARGET, False) is None for f in funcs)
    assert rule.apply(_matmul_func(_linear_module(1, 64, 48, "float32", False)),
                      Target({"kind": "cuda", "arch": "sm_80"}), False) is None


def test_apply_default_schedule_pass():
    """The integration compile.py uses: dl.ApplyDefaultSchedule(CPUGemm()) under the llvm target."""
    mod = _linear_module(DYNAMIC, 64, 48, "float32", residual=True)
    with TARGET:
        mod = dl.ApplyDefaultSchedule(CPUGemm())(mod)
    func = _matmul_func(mod)
    assert func.attrs["tirx.is_scheduled"]
    assert _is_scheduled(func)


def test_vector_unit_follows_target():
    """Tiles follow the target's SIMD width: generic x86-64 is SSE2, znver5 has AVX-512."""
    assert VectorUnit.of(TARGET).lanes("float32") == 4
    assert VectorUnit.of(Target({"kind": "llvm", "mcpu": "haswell"})).lanes("float32") == 8
    assert VectorUnit.of(Target({"kind": "llvm", "mcpu": "znver5"})).lanes("float16") == 32
