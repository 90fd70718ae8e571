"""The project's native libraries (built by the top-level CMakeLists.txt into this directory).

None carries a library search path: each links only libraries that are already in the process when
it is loaded, and the dynamic loader matches their sonames to the loaded copies.

- libatom_tvm_native.so (the KV page manager) links libtvm_ffi only, so `import tvm_ffi` is all it
  needs: it loads under runtime-only TVM.
- libatom_tvm_disco.so (the `atom_cpu` collective) also links libtvm_runtime and
  libtvm_runtime_extra; `atom_tvm.runtime.tvm_libs.load_disco` loads them first.
- libtvm_disco_nccl.so (TVM's NCCL collective, built only where CUDA and NCCL are found) also links
  libcudart and libnccl; `atom_tvm.runtime.tvm_libs.load_nccl` loads them first.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import tvm_ffi

from atom_tvm.errors import UserError

_HERE = Path(__file__).resolve().parent
LIBRARY_PATH = _HERE / "libatom_tvm_native.so"
DISCO_LIBRARY_PATH = _HERE / "libatom_tvm_disco.so"
NCCL_PLUGIN_PATH = _HERE / "libtvm_disco_nccl.so"
BUILD_COMMAND = "cmake -S . -B build -DCMAKE_BUILD_TYPE=Release && cmake --build build -j2"


def _check_built(path: Path, where: str = "") -> None:
    if not path.is_file():
        raise UserError(f"{path} is missing; build it from the repository root{where} with `{BUILD_COMMAND}`")


@functools.cache
def library() -> tvm_ffi.Module:
    """The loaded page manager library (once per process); a UserError naming the build command if it is missing."""
    _check_built(LIBRARY_PATH)
    return tvm_ffi.load_module(LIBRARY_PATH)


@functools.cache
def load_disco_library() -> ctypes.CDLL:
    """Load libatom_tvm_disco.so, whose static initializers register `runtime.disco.atom_cpu.*`.
    TVM's libtvm_runtime_extra must be loaded already."""
    _check_built(DISCO_LIBRARY_PATH)
    return ctypes.CDLL(str(DISCO_LIBRARY_PATH))


@functools.cache
def load_nccl_plugin() -> ctypes.CDLL:
    """Load libtvm_disco_nccl.so, whose static initializers register `runtime.disco.nccl.*`.
    TVM's libtvm_runtime_extra and libtvm_runtime_cuda (which brings libcudart) and libnccl.so.2 must
    be loaded already, or libnccl.so.2 on LD_LIBRARY_PATH; an OSError names what is missing."""
    _check_built(NCCL_PLUGIN_PATH, " of a host with the CUDA toolkit and NCCL (pip install nvidia-nccl-cu13, "
                                   "or pass -DNCCL_ROOT=<dir> to the first cmake)")
    return ctypes.CDLL(str(NCCL_PLUGIN_PATH))
