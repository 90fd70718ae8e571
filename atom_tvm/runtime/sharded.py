"""Run a tensor-parallel package (``--tensor-parallel-shards N``) on N GPUs through TVM's Disco.

`ShardedPackage` is the controller: one Disco worker per GPU (a `ProcessSession` whose workers run
`atom_tvm.runtime.disco_worker`, NCCL between them) or, on the CPU, per thread (a
`ThreadedSession` with atom-tvm's in-process collective, for tests). Every worker runs the same
library on its shard of the weights (`atom_tvm.runtime.sharded_worker`); the all-reduces inside
the library keep them in step. The controller keeps what there is one of: the tokenizer, the page
manager of the KV cache (its tables go to every worker each step) and the sampling, on the logits
copied back from worker 0. It offers what `LoadedPackage` does (``forward``, ``probs``,
``open_kv_cache``, config and metadata), so the chat runtime, the batching engine and the server
run either.
"""

from __future__ import annotations

import atexit
import json
from pathlib import Path

import numpy as np
import tvm
import tvm_ffi

from atom_tvm import package
from atom_tvm.errors import UserError
from atom_tvm.runtime.engine import PackageFiles, load_device
from atom_tvm.runtime.kv_cache import AtomKVCache, cache_pages
from atom_tvm.runtime.tvm_libs import init_ccl, load_disco

_WORKER_FUNCS = ("load", "open_kv_cache", "copy_pages", "forward", "unload")


def _shape(values) -> tvm_ffi.Shape:
    return tvm_ffi.Shape(np.asarray(values, dtype=np.int64).tolist())


class ShardedPages:
    """Every worker's share of the KV pages, as `AtomKVCache` sees its pages."""

    def __init__(self, owner: "ShardedPackage", num_pages: int, page_size: int, max_batch: int):
        self.owner = owner
        owner.call("open_kv_cache", num_pages, page_size, max_batch)

    def copy(self, src: np.ndarray, dst: np.ndarray) -> None:
        self.owner.call("copy_pages", _shape(src), _shape(dst))

    def step_arg(self, tables: list[np.ndarray]) -> list[tvm_ffi.Shape]:
        return [_shape(t) for t in tables]


class ShardedPackage(PackageFiles):
    """A tensor-parallel package loaded on as many GPUs (``device='cuda'``) or CPU worker threads as
    it has shards. ``random_seed`` (benchmarks of library-only packages): random weights made on
    each GPU instead of the package's."""

    def __init__(self, package_dir: str | Path, device: str = "cuda", random_seed: int | None = None):
        super().__init__(package_dir, device)
        shards = self.tensor_parallel_shards
        if random_seed is None:
            package.check_tensor_parallel_files(self.package_dir, shards)
        disco = load_disco()
        if device == "cuda":
            load_device("cuda")
            visible = sum(1 for i in range(shards) if tvm.cuda(i).exist)
            if visible < shards:
                raise UserError(f"{self.package_dir} is split over {shards} GPUs and this host shows {visible}; "
                                "run it where it has enough GPUs, or rebuild with fewer --tensor-parallel-shards")
            self.session = disco.ProcessSession(shards, entrypoint="atom_tvm.runtime.disco_worker")
        else:
            self.session = disco.ThreadedSession(shards)
            # A threaded session still running when the interpreter exits aborts it (its worker
            # threads are never joined): end it first.
            atexit.register(self.session.shutdown)
        init_ccl(self.session, device, shards)
        self.session.import_python_module("atom_tvm.runtime.sharded_worker")
        self._funcs = {name: self.session.get_global_func(f"atom_tvm.shard.{name}") for name in _WORKER_FUNCS}
        meta = self.call("load", str(self.package_dir.resolve()), -1 if random_seed is None else random_seed)
        self.metadata = json.loads(meta.debug_get_from_remote(0))
        self.dtype = self.metadata["kv_cache"]["dtype"]
        self.hidden_size = self.metadata["hidden_size"]
        self.vocab_size = self.metadata["vocab_size"]

    def call(self, name: str, *args):
        """Worker function ``atom_tvm.shard.<name>`` on every worker; its remote result."""
        return self._funcs[name](*args)

    def open_kv_cache(self, max_batch: int, max_total_tokens: int) -> AtomKVCache:
        """A fresh KV cache (replacing the workers' previous one) for up to ``max_batch`` sequences
        holding ``max_total_tokens`` tokens: pages on every shard, one page manager here."""
        num_pages, page_size = cache_pages(self.metadata, max_batch, max_total_tokens)
        return AtomKVCache(ShardedPages(self, num_pages, page_size, max_batch), num_pages, page_size, max_batch)

    def forward(self, fn: str, token_ids, kv_arg, rows: int = 1, logit_positions=None) -> tvm.runtime.Tensor:
        """`LoadedPackage.forward` on every shard; the float32 logits, copied to the host from worker 0."""
        positions = [] if logit_positions is None else logit_positions
        out = self.call("forward", fn, _shape(token_ids), rows, _shape(positions), *kv_arg)
        shape = (rows if fn in ("decode", "batch_decode") else 1, len(positions) if fn == "batch_prefill" else 1,
                 self.vocab_size)
        logits = tvm.runtime.empty(shape, "float32", tvm.cpu())
        self.session.copy_from_worker_0(logits, out)
        self.session.sync_worker_0()  # the copy is queued like every command: wait until it is done
        return logits

    def probs(self, logits: tvm.runtime.Tensor, temperatures) -> np.ndarray:
        """Softmax of ``logits [B, 1, vocab]`` at one temperature per row, here on the host; [B, vocab]."""
        scaled = logits.numpy().reshape(logits.shape[0], -1).astype(np.float64)
        scaled /= np.asarray(temperatures, dtype=np.float64)[:, None]
        scaled = np.exp(scaled - scaled.max(axis=1, keepdims=True))
        return (scaled / scaled.sum(axis=1, keepdims=True)).astype(np.float32)

    def close(self) -> None:
        """Free the workers' weights and pages. The session itself ends when its last reference goes
        (shutting it down while remote references remain kills the process when they are freed)."""
        self.call("unload")
        self.session.sync_worker_0()
        self._funcs.clear()
