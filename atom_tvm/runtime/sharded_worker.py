"""The worker side of a tensor-parallel package: what each Disco worker runs for `ShardedPackage`.

Importing this module (the session's ``import_python_module``) registers the functions below as
global functions of the worker, which the controller calls on every worker at once. Each worker
holds its shard: a `LoadedPackage` of the shared library with its ``tp-shard-<k>`` weights on its
GPU (the device the collective library bound it to), and its share of the KV pages. The page
tables come from the controller's one page manager as shapes (Disco passes integers, strings,
shapes and remote references, not arrays), so every shard appends to and reads the same pages.
"""

from __future__ import annotations

import json

import numpy as np
import tvm
import tvm_ffi

from atom_tvm.runtime.engine import LoadedPackage
from atom_tvm.runtime.kv_cache import LocalPages


class ShardWorker:
    def __init__(self, package_dir: str, random_seed: int):
        device = tvm_ffi.get_global_func("runtime.disco.device")()
        shard = _worker_id()
        make_param = None
        if random_seed >= 0:  # a library-only package for timing: random weights made on the GPU
            from atom_tvm.runtime.random_weights import param_maker

            make_param = param_maker(f"cuda:{device.index}" if device.dlpack_device_type() == 2 else "cpu",
                                     random_seed + shard)
        self.package = LoadedPackage(package_dir, device, make_param, shard=shard)
        self.pages: LocalPages | None = None


# ThreadedSession's workers are threads of one process, so the state is kept per worker id.
_WORKERS: dict[int, ShardWorker] = {}


def _worker_id() -> int:
    return int(tvm_ffi.get_global_func("runtime.disco.worker_id")()[0])


def _shape_array(values: tvm_ffi.Shape) -> np.ndarray:
    return np.asarray(list(values), dtype=np.int32)


@tvm_ffi.register_global_func("atom_tvm.shard.load", override=True)
def load(package_dir: str, random_seed: int) -> str:
    """Load this worker's shard; returns the library's metadata (JSON)."""
    worker = _WORKERS[_worker_id()] = ShardWorker(package_dir, random_seed)
    return json.dumps(worker.package.metadata)


@tvm_ffi.register_global_func("atom_tvm.shard.open_kv_cache", override=True)
def open_kv_cache(num_pages: int, page_size: int, max_batch: int) -> None:
    worker = _WORKERS[_worker_id()]
    worker.pages = None  # free the previous cache's pages first
    worker.pages = LocalPages(worker.package.vm, worker.package.device, num_pages, page_size, max_batch)


@tvm_ffi.register_global_func("atom_tvm.shard.copy_pages", override=True)
def copy_pages(src: tvm_ffi.Shape, dst: tvm_ffi.Shape) -> None:
    _WORKERS[_worker_id()].pages.copy(_shape_array(src), _shape_array(dst))


@tvm_ffi.register_global_func("atom_tvm.shard.forward", override=True)
def forward(fn: str, token_ids: tvm_ffi.Shape, rows: int, logit_positions: tvm_ffi.Shape,
            *tables: tvm_ffi.Shape) -> tvm.runtime.Tensor:
    """`LoadedPackage.forward` on this shard with the step's page tables; the logits (the same on
    every shard after the last all-reduce) stay on the GPU for the controller to copy from worker 0."""
    worker = _WORKERS[_worker_id()]
    kv_arg = worker.pages.step_arg([_shape_array(t) for t in tables])
    positions = _shape_array(logit_positions) if fn == "batch_prefill" else None
    return worker.package.forward(fn, list(token_ids), kv_arg, rows, positions)


@tvm_ffi.register_global_func("atom_tvm.shard.unload", override=True)
def unload() -> None:
    _WORKERS.pop(_worker_id(), None)
