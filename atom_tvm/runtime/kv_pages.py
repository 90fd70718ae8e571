"""Host-side page manager of the quantized paged KV cache: which pages each sequence holds.

The page layout is `tir_kernels.kv_attention`'s: pages of ``P`` tokens, a batch's pages listed
CSR-style (``page_indptr``, ``page_indices``, ``last_page_len``), a new token written to slot
``page * P + offset``. This module decides the page numbers; the device buffers and the kernels
live elsewhere. The work is done by a native object (atom_tvm/native/page_manager.cc, through
tvm-ffi) because `begin_forward` runs every decode step for the whole batch.

Rules
-----
* Pages come from one free list and carry a reference count. `fork_sequence` lets the child share
  the parent's full pages (count + 1) and copies the partial last page into a fresh page: the
  call returns that (src, dst) pair, which the caller copies on the device before the next
  forward. A page goes back to the free list when its count reaches 0 (`remove_sequence`,
  `popn` emptying it).
* `begin_forward(seq_ids, append_lengths)` takes the pages the appends need, all or nothing: if
  the free list is short it changes nothing and raises `KVCacheFull` (a UserError), which an
  engine catches to wait or preempt. A sequence whose next token lands in a shared page (a
  fork followed by `popn` into the shared part) gets a private copy first: that (src, dst) pair
  is in ``copy_pages`` and must be copied before the step's append kernel runs. Lengths are
  updated right away (the forward is assumed to succeed; undo a failed one with `popn`).
* The arrays `begin_forward` returns are views of buffers the native object owns and rewrites
  at the next `begin_forward`: use (or copy) them before calling it again. They are read-only.
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import numpy as np
import tvm_ffi

from atom_tvm import native
from atom_tvm.errors import UserError

__all__ = ["DEFAULT_PAGE_SIZE", "KVCacheFull", "ForwardMetadata", "PageManager"]

#: tir_kernels.kv_attention.PAGE_SIZE (not imported: that module needs TVM's compiler, this one
#: runs under runtime-only TVM; tests/test_kv_pages.py checks that the two agree).
DEFAULT_PAGE_SIZE = 16


class KVCacheFull(UserError):
    """Not enough free pages for a request; nothing was changed."""


# The native side raises these error kinds; tvm-ffi turns them into these classes.
tvm_ffi.register_error("atom_tvm.UserError", UserError)
tvm_ffi.register_error("atom_tvm.KVCacheFull", KVCacheFull)


class ForwardMetadata(NamedTuple):
    """int32 metadata of one forward step (B sequences, n new tokens), in the kernels' layout."""

    #: [B+1] the new tokens of sequence b are rows qo_indptr[b]:qo_indptr[b+1] of the step
    qo_indptr: np.ndarray
    #: [B+1] sequence b's pages are page_indices[page_indptr[b]:page_indptr[b+1]], in token order
    page_indptr: np.ndarray
    #: [page_indptr[B]]
    page_indices: np.ndarray
    #: [B] tokens used in each sequence's last page, 1..P (after this step's appends)
    last_page_len: np.ndarray
    #: [n] page * P + offset of each new token
    append_slots: np.ndarray
    #: [n] each new token's position in its sequence
    positions: np.ndarray
    #: [c, 2] (src, dst) pages to copy on the device before the append (copy-on-write)
    copy_pages: np.ndarray


def _index(name: str, value) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise UserError(f"{name} must be an integer, got {value!r}") from None


def _kv_row_bytes(head_dim: int, kv_bits: int) -> int:
    """Bytes of one token's K (or V) for one KV head, in `kv_attention`'s page layout."""
    if kv_bits == 16:
        return 2 * head_dim
    if kv_bits in (4, 8):
        if head_dim * kv_bits % 8:
            raise UserError(f"head_dim {head_dim} does not pack into bytes at {kv_bits} bits; use an even head_dim")
        return head_dim * kv_bits // 8 + 4  # codes, then the float16 (scale, zero) pair
    raise UserError(f"{kv_bits}-bit KV cache is not supported; use 4, 8 or 16")


class PageManager:
    """Pages, page tables and the per-step metadata of a paged KV cache of ``num_pages`` pages."""

    #: Native buffers that begin_forward writes, in ForwardMetadata's field order (copy_pairs last).
    _OUTPUTS = ("qo_indptr", "page_indptr", "page_indices", "last_page_len", "append_slots", "positions",
                "copy_pairs")

    def __init__(self, num_pages: int, page_size: int = DEFAULT_PAGE_SIZE, max_batch: int = 256):
        lib = native.library()
        self.num_pages = _index("num_pages", num_pages)
        self.page_size = _index("page_size", page_size)
        self.max_batch = _index("max_batch", max_batch)
        self._native = lib.page_manager_create(self.num_pages, self.page_size, self.max_batch)
        # Bound once: attribute lookups on the module cost more than the calls themselves.
        self._buffer = lib.page_manager_buffer
        self._add = lib.page_manager_add_sequence
        self._remove = lib.page_manager_remove_sequence
        self._fork = lib.page_manager_fork_sequence
        self._popn = lib.page_manager_popn
        self._length = lib.page_manager_sequence_length
        self._pages = lib.page_manager_sequence_pages
        self._num_free = lib.page_manager_num_free_pages
        self._begin = lib.page_manager_begin_forward
        self._seq_ids = self._view("seq_ids")
        self._append_lengths = self._view("append_lengths")
        self._step_info = self._view("step_info")
        self._import_outputs()

    @staticmethod
    def pages_for_budget(budget_bytes: int, num_layers: int, num_kv_heads: int, head_dim: int, kv_bits: int,
                         page_size: int = DEFAULT_PAGE_SIZE) -> int:
        """How many pages (each holding K and V of every layer) fit in ``budget_bytes``."""
        for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                            ("page_size", page_size)):
            if _index(name, value) < 1:
                raise UserError(f"{name} must be at least 1, got {value}")
        if _index("budget_bytes", budget_bytes) < 0:
            raise UserError(f"budget_bytes must not be negative, got {budget_bytes}")
        page_bytes = num_layers * 2 * num_kv_heads * page_size * _kv_row_bytes(head_dim, kv_bits)
        return budget_bytes // page_bytes

    # -- sequences -------------------------------------------------------------------------

    def add_sequence(self, seq_id: int) -> None:
        self._add(self._native, _index("seq_id", seq_id))

    def remove_sequence(self, seq_id: int) -> None:
        """Drop the sequence; its pages go back to the free list once no fork holds them."""
        self._remove(self._native, _index("seq_id", seq_id))

    def fork_sequence(self, parent_id: int, child_id: int) -> list[tuple[int, int]]:
        """A new sequence ``child_id`` with the parent's tokens; the (src, dst) pages to copy."""
        pair = self._fork(self._native, _index("parent_id", parent_id), _index("child_id", child_id))
        return [(pair[0], pair[1])] if len(pair) else []

    def popn(self, seq_id: int, n: int) -> None:
        """Drop the last ``n`` tokens of the sequence, freeing the pages they emptied."""
        self._popn(self._native, _index("seq_id", seq_id), _index("n", n))

    def sequence_length(self, seq_id: int) -> int:
        return self._length(self._native, _index("seq_id", seq_id))

    def sequence_pages(self, seq_id: int) -> np.ndarray:
        """The sequence's pages in token order (a fresh int32 array)."""
        return np.asarray(self._pages(self._native, _index("seq_id", seq_id)), dtype=np.int32)

    @property
    def num_free_pages(self) -> int:
        return self._num_free(self._native)

    @property
    def num_used_pages(self) -> int:
        return self.num_pages - self._num_free(self._native)

    # -- the forward step ------------------------------------------------------------------

    def begin_forward(self, seq_ids, append_lengths) -> ForwardMetadata:
        """Pages and metadata for appending ``append_lengths[b]`` tokens to ``seq_ids[b]``.

        Integer sequences of equal length; int64 numpy arrays are the fastest. Raises
        `KVCacheFull` (nothing changed) when the free pages do not suffice.
        """
        batch = len(seq_ids)
        if len(append_lengths) != batch:
            raise UserError(f"begin_forward got {batch} seq_ids but {len(append_lengths)} append_lengths")
        if not 1 <= batch <= self.max_batch:
            raise UserError(f"begin_forward got {batch} sequences; this page manager takes 1 to "
                            f"{self.max_batch} (max_batch)")
        try:
            np.copyto(self._seq_ids[:batch], seq_ids, casting="same_kind")
            np.copyto(self._append_lengths[:batch], append_lengths, casting="same_kind")
        except (TypeError, ValueError, OverflowError):
            raise UserError("begin_forward takes integer seq_ids and append_lengths") from None
        self._begin(self._native, batch)
        # step_info: the native StepInfo slots.
        num_tokens, num_entries, num_copies, generation = self._step_info.tolist()
        if generation != self._generation:
            self._import_outputs()
        qo_indptr, page_indptr, page_indices, last_page_len, slots, positions, copy_pairs = self._outputs
        return ForwardMetadata(qo_indptr[:batch + 1], page_indptr[:batch + 1], page_indices[:num_entries],
                               last_page_len[:batch], slots[:num_tokens], positions[:num_tokens],
                               copy_pairs[:num_copies])

    def _view(self, name: str) -> np.ndarray:
        return np.from_dlpack(self._buffer(self._native, name))

    def _import_outputs(self) -> None:
        """(Re-)import the output views; the native side replaces a buffer when it outgrows it."""
        views = [self._view(name) for name in self._OUTPUTS]
        views[-1] = views[-1].reshape(-1, 2)
        for view in views:
            view.flags.writeable = False
        self._outputs = tuple(views)
        self._generation = self._step_info.tolist()[3]
