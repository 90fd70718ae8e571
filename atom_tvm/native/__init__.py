"""The project's native library (built by the top-level CMakeLists.txt), loaded through tvm-ffi.

It links libtvm_ffi only, so `import tvm_ffi` is all it needs: it loads under runtime-only TVM.
"""

from __future__ import annotations

import functools
from pathlib import Path

import tvm_ffi

from atom_tvm.errors import UserError

LIBRARY_PATH = Path(__file__).resolve().parent / "libatom_tvm_native.so"
BUILD_COMMAND = "cmake -S . -B build -DCMAKE_BUILD_TYPE=Release && cmake --build build -j2"


@functools.cache
def library() -> tvm_ffi.Module:
    """The loaded library (once per process); a UserError naming the build command if it is missing."""
    if not LIBRARY_PATH.is_file():
        raise UserError(f"{LIBRARY_PATH} is missing; build it from the repository root with `{BUILD_COMMAND}`")
    return tvm_ffi.load_module(LIBRARY_PATH)
