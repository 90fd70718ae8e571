"""CUDA builds on a GPU-less host: target presets, nvcc fatbins with one SASS per arch, read-back.

The build tests compile one tiny vector-add kernel (a single nvcc run of about a second per
build), because CI has two cores. They skip only when nvcc or cuobjdump is absent.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tvm
import tvm_ffi
from tvm.script import tirx as T

from atom_tvm import cuda_build
from atom_tvm.errors import UserError
from deploy.targets import SUPPORTED_ARCHS, make_target, parse_archs

REPO_ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- target presets


def test_parse_archs_dedupes_and_keeps_order():
    assert parse_archs("sm_90a, sm_80,sm_89,sm_80") == ["sm_90a", "sm_80", "sm_89"]
    assert parse_archs("sm_86") == ["sm_86"]


@pytest.mark.parametrize("text", ["sm_75", "sm80", "sm_80,sm_75", ""])
def test_parse_archs_refuses_unknown(text):
    with pytest.raises(UserError) as info:
        parse_archs(text)
    message = str(info.value)
    assert "\n" not in message
    assert all(arch in message for arch in SUPPORTED_ARCHS)


def test_make_target_cuda_uses_lowest_arch_and_llvm_host():
    target = make_target("cuda", ["sm_90a", "sm_86", "sm_89"])
    assert target.kind.name == "cuda"
    assert str(target.attrs["arch"]) == "sm_86"
    assert target.host is not None and target.host.kind.name == "llvm"
    assert make_target("llvm", []).kind.name == "llvm"


def test_make_target_refuses_unknown_kind_and_arch():
    with pytest.raises(UserError) as info:
        make_target("rocm", ["sm_80"])
    message = str(info.value)
    assert "\n" not in message and "llvm" in message and "cuda" in message and "rocm" in message

    with pytest.raises(UserError) as info:
        make_target("cuda", ["sm_75"])
    assert "\n" not in str(info.value) and "sm_90a" in str(info.value)


def test_gencode_flags():
    assert cuda_build.nvcc_gencode_flags(["sm_90a", "sm_80"]) == [
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_80,code=compute_80",
    ]


def test_missing_nvcc_is_a_user_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no nvcc anywhere
    with pytest.raises(UserError, match="nvcc not found: install the CUDA toolkit"):
        with cuda_build.use_nvcc_fatbin(["sm_80"]):
            pass


# ---------------------------------------------------------------------------- real builds


@T.prim_func
def vector_add(
    A: T.Buffer((256,), "float32"), B: T.Buffer((256,), "float32"), C: T.Buffer((256,), "float32")
):
    for bx in T.thread_binding(2, thread="blockIdx.x"):
        for tx in T.thread_binding(128, thread="threadIdx.x"):
            C[bx * 128 + tx] = A[bx * 128 + tx] + B[bx * 128 + tx]


def _build(archs, out_path):
    """Compile vector_add for ``archs``, export it, and return the nvcc statistics."""
    with cuda_build.use_nvcc_fatbin(archs) as stats:
        executable = tvm.compile(vector_add, make_target("cuda", archs))
    executable.export_library(str(out_path))
    print(f"nvcc for {archs}: {stats.calls} run(s), {stats.seconds:.2f} s")
    return stats


def test_fatbin_has_sass_for_each_arch(cuda_toolchain, tmp_path):
    lib = tmp_path / "vector_add.so"
    stats = _build(["sm_80", "sm_89", "sm_90a"], lib)
    assert stats.calls == 1  # one nvcc run builds every arch
    assert cuda_build.list_cuda_codes(lib) == {"sass": ["sm_80", "sm_89", "sm_90a"], "ptx": ["sm_80"]}

    # The CUDA runtime is registered in this process (stand-in or real driver), so it loads.
    module = tvm.runtime.load_module(str(lib))
    assert module is not None


def test_single_arch_build(cuda_toolchain, tmp_path):
    lib = tmp_path / "vector_add_sm86.so"
    _build(["sm_86"], lib)
    assert cuda_build.list_cuda_codes(lib) == {"sass": ["sm_86"], "ptx": ["sm_86"]}


def test_nvcc_hook_is_restored(cuda_toolchain):
    before = tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True)
    with cuda_build.use_nvcc_fatbin(["sm_80"]):
        inside = tvm_ffi.get_global_func("tvm_callback_cuda_compile")
        assert before is None or not inside.same_as(before)
    after = tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True)
    assert (after is None) if before is None else after.same_as(before)


def test_without_cuda_runtime(cuda_toolchain, tmp_path):
    """A fresh process without enable_cuda_codegen: the fatbin library does not load, and a build
    keeps CUDA source, which list_cuda_codes reports as such."""
    lib = tmp_path / "vector_add.so"
    _build(["sm_80"], lib)
    script = textwrap.dedent(
        f"""
        import tvm
        import tvm_ffi
        from tvm.script import tirx as T
        from atom_tvm import cuda_build
        from atom_tvm.errors import UserError
        from deploy.targets import make_target

        assert tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is None
        try:
            tvm.runtime.load_module({str(lib)!r})
        except Exception as err:
            assert "load_from_bytes.cuda" in str(err), err
        else:
            raise AssertionError("loaded a CUDA library without the CUDA runtime")

        @T.prim_func
        def copy(A: T.Buffer((32,), "float32"), B: T.Buffer((32,), "float32")):
            for tx in T.thread_binding(32, thread="threadIdx.x"):
                B[tx] = A[tx]

        tvm.compile(copy, make_target("cuda", ["sm_80"])).export_library({str(tmp_path / "src.so")!r})
        try:
            cuda_build.list_cuda_codes({str(tmp_path / "src.so")!r})
        except UserError as err:
            assert "holds CUDA source" in str(err), err
        else:
            raise AssertionError("source-only library reported as a fatbin")
        """
    )
    # A file, not `python -c`: TVMScript parses the function's source text.
    (tmp_path / "fresh.py").write_text(script)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "fresh.py")], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
