"""The KV cache of a loaded package, behind one interface whichever cache the package was built with.

* `TVMKVCache`: TVM's paged cache, a runtime object driven through the ``vm.builtin.kv_state_*``
  functions (fp16/fp32 packages built with ``--kv-cache tvm``).
* `AtomKVCache`: Atom's quantized pages (``--kv-cache int4|int8|fp16``): page buffers from the
  library's ``create_paged_kv_cache``, page tables from the native page manager
  (`atom_tvm.runtime.kv_pages`), uploaded before every forward step.

An engine calls ``begin_forward(seq_ids, lengths)``, passes what it returns as the entry point's
``paged_kv_cache`` argument, then calls ``end_forward()``; sequences are added, removed, forked
and shortened (``popn``) between steps. Both raise `KVCacheFull` when a step's new tokens do not
fit, before anything changed, so the caller can wait, preempt or report.
"""

from __future__ import annotations

import abc

import numpy as np
import tvm
import tvm_ffi

from atom_tvm.errors import UserError
from atom_tvm.runtime.kv_pages import KVCacheFull, PageManager

__all__ = ["KVCache", "KVCacheFull", "TVMKVCache", "AtomKVCache", "LocalPages", "open_kv_cache", "cache_pages",
           "page_size_of"]


class KVCache(abc.ABC):
    """A paged KV cache holding up to ``capacity_tokens`` tokens in pages of ``page_size``."""

    page_size: int
    num_pages: int

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    @abc.abstractmethod
    def num_free_pages(self) -> int: ...

    @abc.abstractmethod
    def add_sequence(self, seq_id: int) -> None: ...

    @abc.abstractmethod
    def remove_sequence(self, seq_id: int) -> None: ...

    @abc.abstractmethod
    def fork_sequence(self, parent_id: int, child_id: int) -> None: ...

    @abc.abstractmethod
    def popn(self, seq_id: int, n: int) -> None: ...

    @abc.abstractmethod
    def begin_forward(self, seq_ids: list[int], lengths: list[int]):
        """Reserve room for ``lengths[i]`` new tokens of each sequence; returns the entry point's
        ``paged_kv_cache`` argument for this step."""

    @abc.abstractmethod
    def end_forward(self) -> None: ...


def _shape(*values: int) -> tvm_ffi.Shape:
    return tvm_ffi.Shape(list(values))


class TVMKVCache(KVCache):
    """TVM's `PagedKVCache` runtime object."""

    def __init__(self, vm, num_pages: int, page_size: int, max_batch: int, prefill_chunk: int):
        self.page_size, self.num_pages = page_size, num_pages
        self.obj = vm["create_paged_kv_cache"](_shape(max_batch), _shape(num_pages * page_size),
                                               _shape(prefill_chunk), _shape(page_size), _shape(0))
        self._call = {name: tvm_ffi.get_global_func(f"vm.builtin.{name}") for name in (
            "kv_state_add_sequence", "kv_state_remove_sequence", "kv_state_fork_sequence", "kv_state_popn",
            "kv_state_begin_forward", "kv_state_end_forward", "attention_kv_cache_get_num_available_pages")}

    def num_free_pages(self) -> int:
        return int(self._call["attention_kv_cache_get_num_available_pages"](self.obj))

    def add_sequence(self, seq_id: int) -> None:
        self._call["kv_state_add_sequence"](self.obj, seq_id)

    def remove_sequence(self, seq_id: int) -> None:
        self._call["kv_state_remove_sequence"](self.obj, seq_id)

    def fork_sequence(self, parent_id: int, child_id: int) -> None:
        self._call["kv_state_fork_sequence"](self.obj, parent_id, child_id, -1)

    def popn(self, seq_id: int, n: int) -> None:
        self._call["kv_state_popn"](self.obj, seq_id, n)

    def begin_forward(self, seq_ids: list[int], lengths: list[int]):
        # TVM's cache aborts the process when it runs out of pages: check first. The bound is the
        # Atom cache's rule (a sequence's last page may have room), so it never refuses a step
        # that fits; TVM's own page count is what it is checked against.
        need = sum(-(-n // self.page_size) for n in lengths)
        free = self.num_free_pages()
        if need > free:
            raise KVCacheFull(f"KV cache full: this step may need {need} pages, {free} are free")
        self._call["kv_state_begin_forward"](self.obj, tvm_ffi.Shape(list(seq_ids)), tvm_ffi.Shape(list(lengths)))
        return self.obj

    def end_forward(self) -> None:
        self._call["kv_state_end_forward"](self.obj)


class LocalPages:
    """Atom's page buffers on this process's device, made by the library's ``create_paged_kv_cache``."""

    def __init__(self, vm, device, num_pages: int, page_size: int, max_batch: int):
        self.device = device
        self.buffers = list(vm["create_paged_kv_cache"](_shape(max_batch), _shape(num_pages * page_size),
                                                         _shape(0), _shape(page_size), _shape(0)))
        self._copy_pages = vm["copy_kv_pages"]

    def copy(self, src: np.ndarray, dst: np.ndarray) -> None:
        """Page ``src[i]`` of every layer onto page ``dst[i]``."""
        self._copy_pages(self.buffers, tvm.runtime.tensor(src, self.device), tvm.runtime.tensor(dst, self.device))

    def step_arg(self, tables: list[np.ndarray]) -> list:
        """The entry points' ``paged_kv_cache`` argument: the buffers, then this step's tables."""
        return [*self.buffers, *(tvm.runtime.tensor(t, self.device) for t in tables)]


class AtomKVCache(KVCache):
    """Atom's page buffers (``pages``: `LocalPages`, or every shard's through
    `atom_tvm.runtime.sharded.ShardedPages`) plus the native page manager on the host."""

    def __init__(self, pages, num_pages: int, page_size: int, max_batch: int):
        self.page_size, self.num_pages = page_size, num_pages
        self.pages = pages
        self.manager = PageManager(num_pages, self.page_size, max_batch)

    def _apply_copies(self, copies) -> None:
        if len(copies):
            copies = np.asarray(copies, dtype=np.int32).reshape(-1, 2)
            self.pages.copy(np.ascontiguousarray(copies[:, 0]), np.ascontiguousarray(copies[:, 1]))

    def num_free_pages(self) -> int:
        return self.manager.num_free_pages

    def add_sequence(self, seq_id: int) -> None:
        self.manager.add_sequence(seq_id)

    def remove_sequence(self, seq_id: int) -> None:
        self.manager.remove_sequence(seq_id)

    def fork_sequence(self, parent_id: int, child_id: int) -> None:
        self._apply_copies(self.manager.fork_sequence(parent_id, child_id))

    def popn(self, seq_id: int, n: int) -> None:
        self.manager.popn(seq_id, n)

    def begin_forward(self, seq_ids: list[int], lengths: list[int]):
        step = self.manager.begin_forward(np.asarray(seq_ids, np.int64), np.asarray(lengths, np.int64))
        self._apply_copies(step.copy_pages)
        # The arrays are views the next begin_forward overwrites: the pages upload (or send) them now.
        return self.pages.step_arg([step.qo_indptr, step.page_indptr, step.page_indices, step.last_page_len,
                                    step.append_slots, step.positions])

    def end_forward(self) -> None:
        """Nothing to do: the page manager updated the lengths when the step began."""


def pages_for_tokens(tokens: int, page_size: int, max_batch: int) -> int:
    """Pages that hold ``tokens`` tokens in any split among ``max_batch`` sequences (each
    sequence's last page may be partly empty)."""
    return -(-tokens // page_size) + max_batch


def page_size_of(metadata: dict) -> int:
    """Tokens per KV page of a library (its ``_metadata``)."""
    return int(metadata.get("page_size", metadata["kv_cache"].get("page_size", 16)))


def cache_pages(metadata: dict, max_batch: int, max_total_tokens: int) -> tuple[int, int]:
    """(pages, page size) of a cache of the library's kind for ``max_total_tokens`` tokens over
    ``max_batch`` sequences."""
    layout = metadata["kv_cache"]
    page_size = page_size_of(metadata)
    if layout.get("kind", "tvm") == "atom" and int(layout["page_size"]) != page_size:
        raise UserError(f"package page size {page_size} differs from its kernels' {layout['page_size']}; rebuild it")
    return pages_for_tokens(max_total_tokens, page_size, max_batch), page_size


def open_kv_cache(vm, device, metadata: dict, max_batch: int, max_total_tokens: int,
                  prefill_chunk: int) -> KVCache:
    """The cache a library was built with, sized for ``max_total_tokens`` tokens over ``max_batch``
    sequences."""
    num_pages, page_size = cache_pages(metadata, max_batch, max_total_tokens)
    if metadata["kv_cache"].get("kind", "tvm") == "atom":
        return AtomKVCache(LocalPages(vm, device, num_pages, page_size, max_batch), num_pages, page_size, max_batch)
    return TVMKVCache(vm, num_pages, page_size, max_batch, prefill_chunk)
