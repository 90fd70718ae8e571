"""Locating and loading TVM's libraries that `import tvm` may leave out: the CUDA runtime, and Disco
(TVM's multi-worker sessions, for tensor parallelism) with its collective libraries.

`import tvm` loads `libtvm_runtime_cuda.so` only when its backend hook runs and a driver is present,
and `libtvm_runtime_extra.so` (Disco) only when the compiler is installed and not disabled
(`TVM_USE_RUNTIME_LIB=1`); runtime-only TVM and a GPU-less build host have to load them themselves.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import importlib.util
import sys
from pathlib import Path

import tvm
import tvm_ffi
from tvm.base import _LOADED_LIBS
from tvm_ffi.libinfo import load_lib_ctypes

from atom_tvm import native
from atom_tvm.errors import UserError


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


# The object classes tvm/runtime/disco/session.py registers, by type key, parents first.
_DISCO_OBJECT_CLASSES = (
    ("runtime.disco.DRef", "DRef"),
    ("runtime.disco.Session", "Session"),
    ("runtime.disco.ThreadedSession", "ThreadedSession"),
    ("runtime.disco.ProcessSession", "ProcessSession"),
    ("runtime.disco.SocketSession", "SocketSession"),
)


@functools.cache
def load_disco():
    """The `tvm.runtime.disco` module, with atom-tvm's CPU collective (`atom_cpu`) registered.

    `import tvm` imports tvm.runtime.disco before it loads libtvm_runtime_extra (and runtime-only TVM
    never loads it), so the package's `_ffi_api` module holds none of Disco's functions: once the
    library is loaded, it is filled in place (the package looks its functions up at call time). The
    import itself either failed on the unknown object types (tvm.runtime.disco is None; it is run
    again) or, under runtime-only TVM, which has tvm-ffi skip unknown types, left the session classes
    unbound to them (they are bound now: re-running the import would register its global functions
    twice).
    """
    if tvm_ffi.get_global_func("runtime.disco.SessionThreaded", allow_missing=True) is None:
        try:
            _LOADED_LIBS["tvm_runtime_extra"] = load_lib_ctypes(
                package="tvm", target_name="tvm_runtime_extra", extra_lib_paths=[runtime_dir()], mode="RTLD_LOCAL")
        except (OSError, RuntimeError) as err:
            raise UserError(f"cannot load TVM's libtvm_runtime_extra ({err}), which has Disco, the multi-GPU "
                            "runtime; reinstall apache-tvm==0.27.0.post1") from None
    ffi_api = sys.modules.get("tvm.runtime.disco._ffi_api")
    if ffi_api is not None and not hasattr(ffi_api, "SessionThreaded"):
        tvm_ffi.init_ffi_api("runtime.disco", ffi_api.__name__)
    if getattr(tvm.runtime, "disco", None) is None:
        tvm.runtime.disco = importlib.import_module("tvm.runtime.disco")
    for type_key, class_name in _DISCO_OBJECT_CLASSES:
        cls = getattr(tvm.runtime.disco.session, class_name)
        if "__tvm_ffi_type_info__" not in cls.__dict__:
            tvm_ffi.register_object(type_key)(cls)
    native.load_disco_library()
    return tvm.runtime.disco


@functools.cache
def load_nccl() -> None:
    """Register TVM's NCCL collective (`runtime.disco.nccl.*`, from atom-tvm's build of the module).

    It needs TVM's CUDA runtime (which brings libcudart) and libnccl.so.2 in the process first:
    libnccl.so.2 from the python's nvidia-nccl-cu* package (torch's CUDA builds install one) when
    there is one, else from wherever the dynamic loader finds it (LD_LIBRARY_PATH).
    """
    load_disco()
    if tvm_ffi.get_global_func("device_api.cuda", allow_missing=True) is None:
        try:
            load_runtime_cuda()
        except (OSError, RuntimeError) as err:
            raise UserError(f"cannot load TVM's CUDA runtime ({err}); NCCL needs an NVIDIA driver") from None
    python_nccl = _python_nccl_library()
    if python_nccl is not None:
        _LOADED_LIBS["nccl"] = ctypes.CDLL(str(python_nccl))
    try:
        native.load_nccl_plugin()
    except OSError as err:
        raise UserError(f"cannot load {native.NCCL_PLUGIN_PATH} ({err}); pip install nvidia-nccl-cu13 or put "
                        "libnccl.so.2 on LD_LIBRARY_PATH") from None


def _python_nccl_library() -> Path | None:
    """libnccl.so.2 of the python's nvidia-nccl-cu* package, if one is installed."""
    try:
        spec = importlib.util.find_spec("nvidia.nccl")
    except ModuleNotFoundError:  # no nvidia namespace package at all
        return None
    for package_dir in spec.submodule_search_locations if spec is not None else ():
        if (Path(package_dir) / "lib" / "libnccl.so.2").is_file():
            return Path(package_dir) / "lib" / "libnccl.so.2"
    return None


def init_ccl(session, device: str, num_workers: int) -> None:
    """Connect a Disco session's workers for collectives: NCCL for device 'cuda' (worker k on GPU k),
    atom-tvm's in-process collective for 'cpu' (ThreadedSession only: its workers are threads)."""
    load_disco()
    if device == "cuda":
        load_nccl()
        session.init_ccl("nccl", *range(num_workers))
    elif device == "cpu":
        # Session.init_ccl accepts only the GPU libraries by name; this is the call it makes.
        init = tvm_ffi.get_global_func("runtime.disco.SessionInitCCL")
        init(session, "atom_cpu", tvm_ffi.Shape(range(num_workers)))
    else:
        raise UserError(f"--device {device!r}: choose cpu or cuda")
