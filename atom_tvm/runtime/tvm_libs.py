"""Locating and loading TVM's CUDA runtime library, shared by the build and the runtime-only host.

`import tvm` loads `libtvm_runtime_cuda.so` only when its backend hook runs and a driver is present;
runtime-only TVM and a GPU-less build host both have to load it themselves.
"""

from __future__ import annotations

from pathlib import Path

from tvm.base import _LOADED_LIBS
from tvm_ffi.libinfo import load_lib_ctypes


def runtime_dir() -> Path:
    """tvm/lib, found the way tvm/backend/cuda finds it: next to the loaded libtvm_runtime."""
    return Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent


def load_runtime_cuda() -> None:
    """Load libtvm_runtime_cuda as tvm.backend.cuda does on a GPU host (raises OSError on failure).

    Loading is all it takes: its static initializers register the CUDA device API and module
    functions. The handle goes into tvm.base._LOADED_LIBS so it stays alive and TVM sees it loaded.
    """
    _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
        package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[runtime_dir()], mode="RTLD_LOCAL")
