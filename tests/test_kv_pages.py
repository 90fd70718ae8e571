"""The KV cache's page manager (atom_tvm.runtime.kv_pages) against a pure-Python model of its rules.

Besides comparing counts, every test simulates the device: a page store of token labels into
which the returned copy pairs are copied and the new tokens written at their slots. Reading each
sequence back through its page table must give exactly its tokens, so a page shared where it
should not be, freed while held, or written at a wrong slot shows up as a wrong token.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from atom_tvm import native
from atom_tvm.errors import UserError
from atom_tvm.runtime.kv_pages import DEFAULT_PAGE_SIZE, KVCacheFull, PageManager

REPO = Path(__file__).resolve().parents[1]


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class RefPage:
    """A page of the reference model: only its holder count matters, not its number."""

    def __init__(self):
        self.holders = 1


class ReferenceModel:
    """The page manager's rules, written out plainly, over abstract pages."""

    def __init__(self, num_pages: int, page_size: int):
        self.num_pages = num_pages
        self.page_size = page_size
        self.free = num_pages
        self.tokens: dict[int, list[int]] = {}
        self.pages: dict[int, list[RefPage]] = {}

    def _new_page(self) -> RefPage:
        self.free -= 1
        return RefPage()

    def _release(self, page: RefPage) -> None:
        page.holders -= 1
        if page.holders == 0:
            self.free += 1

    def add(self, seq_id: int) -> None:
        self.tokens[seq_id] = []
        self.pages[seq_id] = []

    def remove(self, seq_id: int) -> None:
        for page in self.pages.pop(seq_id):
            self._release(page)
        del self.tokens[seq_id]

    def fork_fits(self, parent: int) -> bool:
        return len(self.tokens[parent]) % self.page_size == 0 or self.free >= 1

    def fork(self, parent: int, child: int) -> int:
        """Returns the number of pages the fork copies (0 or 1)."""
        length = len(self.tokens[parent])
        full = length // self.page_size
        shared = self.pages[parent][:full]
        for page in shared:
            page.holders += 1
        copied = [self._new_page()] if length % self.page_size else []
        self.tokens[child] = list(self.tokens[parent])
        self.pages[child] = shared + copied
        return len(copied)

    def popn(self, seq_id: int, n: int) -> None:
        del self.tokens[seq_id][len(self.tokens[seq_id]) - n:]
        keep = ceil_div(len(self.tokens[seq_id]), self.page_size)
        for page in self.pages[seq_id][keep:]:
            self._release(page)
        del self.pages[seq_id][keep:]

    def _writes_shared_page(self, seq_id: int) -> bool:
        return len(self.tokens[seq_id]) % self.page_size != 0 and self.pages[seq_id][-1].holders > 1

    def pages_needed(self, seq_ids, lengths) -> int:
        return sum(ceil_div(len(self.tokens[s]) + n, self.page_size) - len(self.pages[s])
                   + self._writes_shared_page(s) for s, n in zip(seq_ids, lengths))

    def begin_forward(self, seq_ids, new_tokens: list[list[int]]) -> int:
        """Appends the labels; returns the number of copy-on-write pages."""
        copies = 0
        for s, labels in zip(seq_ids, new_tokens):
            if self._writes_shared_page(s):
                self.pages[s][-1].holders -= 1
                self.pages[s][-1] = self._new_page()
                copies += 1
            self.tokens[s].extend(labels)
            while len(self.pages[s]) < ceil_div(len(self.tokens[s]), self.page_size):
                self.pages[s].append(self._new_page())
        return copies


class Harness:
    """A PageManager, the reference model and a simulated device page store, checked together."""

    def __init__(self, num_pages: int, page_size: int, max_batch: int = 64):
        self.pm = PageManager(num_pages, page_size, max_batch)
        self.ref = ReferenceModel(num_pages, page_size)
        self.P = page_size
        self.store = np.full((num_pages, page_size), -1, np.int64)
        self.next_label = 0
        self.next_id = 0

    def labels(self, n: int) -> list[int]:
        self.next_label += n
        return list(range(self.next_label - n, self.next_label))

    def add(self) -> int:
        seq_id, self.next_id = self.next_id, self.next_id + 1
        self.pm.add_sequence(seq_id)
        self.ref.add(seq_id)
        return seq_id

    def remove(self, seq_id: int) -> None:
        self.pm.remove_sequence(seq_id)
        self.ref.remove(seq_id)

    def popn(self, seq_id: int, n: int) -> None:
        self.pm.popn(seq_id, n)
        self.ref.popn(seq_id, n)

    def fork(self, parent: int) -> int:
        child, self.next_id = self.next_id, self.next_id + 1
        pairs = self.pm.fork_sequence(parent, child)
        assert len(pairs) == self.ref.fork(parent, child)
        for src, dst in pairs:
            assert self.pm.sequence_pages(parent)[-1] == src and self.pm.sequence_pages(child)[-1] == dst
            self.store[dst] = self.store[src]
        return child

    def forward(self, seq_ids: list[int], lengths: list[int]):
        old_lengths = [len(self.ref.tokens[s]) for s in seq_ids]
        new_tokens = [self.labels(n) for n in lengths]
        md = self.pm.begin_forward(np.array(seq_ids, np.int64), np.array(lengths, np.int64))
        assert len(md.copy_pages) == self.ref.begin_forward(seq_ids, new_tokens)
        self.check_metadata(md, seq_ids, old_lengths, lengths)
        for src, dst in md.copy_pages:
            self.store[dst] = self.store[src]
        self.store.reshape(-1)[md.append_slots] = np.concatenate(new_tokens)
        return md

    def check_metadata(self, md, seq_ids, old_lengths, lengths) -> None:
        P = self.P
        assert all(a.dtype == np.int32 for a in md)
        np.testing.assert_array_equal(md.qo_indptr, np.concatenate([[0], np.cumsum(lengths)]))
        tables = [self.pm.sequence_pages(s) for s in seq_ids]
        np.testing.assert_array_equal(md.page_indptr, np.concatenate([[0], np.cumsum([len(t) for t in tables])]))
        np.testing.assert_array_equal(md.page_indices, np.concatenate(tables))
        new_lengths = np.add(old_lengths, lengths)
        np.testing.assert_array_equal(md.last_page_len, new_lengths - (np.array([len(t) for t in tables]) - 1) * P)
        assert np.all((md.last_page_len >= 1) & (md.last_page_len <= P))
        positions = np.concatenate([np.arange(o, n) for o, n in zip(old_lengths, new_lengths)])
        np.testing.assert_array_equal(md.positions, positions)
        owner = np.repeat(np.arange(len(seq_ids)), lengths)
        pages = md.page_indices[md.page_indptr[owner] + positions // P]
        np.testing.assert_array_equal(md.append_slots, pages * P + positions % P)

    def check(self) -> None:
        """Counts, page sharing and every sequence's tokens against the reference."""
        pm, ref = self.pm, self.ref
        assert pm.num_free_pages == ref.free
        assert pm.num_free_pages + pm.num_used_pages == pm.num_pages
        physical_of: dict[int, int] = {}
        held = set()
        for seq_id, tokens in ref.tokens.items():
            assert pm.sequence_length(seq_id) == len(tokens)
            table = pm.sequence_pages(seq_id)
            assert len(table) == len(ref.pages[seq_id])
            for ref_page, page in zip(ref.pages[seq_id], table.tolist()):
                # Same abstract page <-> same physical page: sharing exactly where the rules say.
                assert physical_of.setdefault(id(ref_page), page) == page
                held.add(page)
            np.testing.assert_array_equal(self.store[table].reshape(-1)[:len(tokens)], tokens)
        assert len(held) == len(physical_of) == pm.num_used_pages  # no leaked page, none freed while held

    def snapshot(self):
        return (self.pm.num_free_pages,
                {s: (self.pm.sequence_length(s), self.pm.sequence_pages(s).tolist()) for s in self.ref.tokens})


def test_lifecycle_decode_fork_remove_reuse():
    h = Harness(num_pages=64, page_size=16)
    a, b, c = h.add(), h.add(), h.add()
    h.forward([a, b, c], [5, 16, 33])  # partial page, exactly one page, just past two pages
    h.check()
    for _ in range(100):
        h.forward([a, b, c], [1, 1, 1])
        h.check()
    assert [h.pm.sequence_length(s) for s in (a, b, c)] == [105, 116, 133]
    d = h.fork(b)  # 116 = 7 full pages + 4 tokens: 7 shared, 1 copied
    assert len(set(h.pm.sequence_pages(b)[:7]) & set(h.pm.sequence_pages(d))) == 7
    h.check()
    for _ in range(20):
        h.forward([b, d], [1, 1])
        h.check()
    freed_pages = set(h.pm.sequence_pages(a).tolist())
    free_before = h.pm.num_free_pages
    h.remove(a)
    assert h.pm.num_free_pages == free_before + len(freed_pages)
    h.remove(b)  # its shared pages stay with d
    h.check()
    e = h.add()
    # The last pages freed are reused first: b's 2 private pages, then a's.
    h.forward([e], [(len(freed_pages) + 2) * 16])
    assert set(h.pm.sequence_pages(e).tolist()) >= freed_pages
    h.check()
    for seq_id in (c, d, e):
        h.remove(seq_id)
    h.check()
    assert h.pm.num_free_pages == 64


def test_metadata_exact():
    """Page numbers by hand (pages are handed out from 0 up, a freed page first) with P = 4."""
    pm = PageManager(num_pages=8, page_size=4, max_batch=4)
    pm.add_sequence(10)
    pm.add_sequence(20)
    md = pm.begin_forward([10, 20], [4, 5])  # 10 fills its page exactly, 20 spills one token
    assert md.qo_indptr.tolist() == [0, 4, 9]
    assert md.page_indptr.tolist() == [0, 1, 3]
    assert md.page_indices.tolist() == [0, 1, 2]
    assert md.last_page_len.tolist() == [4, 1]
    assert md.append_slots.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert md.positions.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4]
    assert md.copy_pages.shape == (0, 2)
    md = pm.begin_forward([20, 10], [1, 1])
    assert md.qo_indptr.tolist() == [0, 1, 2]
    assert md.page_indptr.tolist() == [0, 2, 4]
    assert md.page_indices.tolist() == [1, 2, 0, 3]
    assert md.last_page_len.tolist() == [2, 1]
    assert md.append_slots.tolist() == [9, 12]
    assert md.positions.tolist() == [5, 4]
    pm.popn(20, 2)  # 6 -> 4 tokens: page 2 emptied and freed
    assert pm.sequence_pages(20).tolist() == [1] and pm.num_free_pages == 5
    md = pm.begin_forward([20], [3])
    assert md.page_indices.tolist() == [1, 2] and md.append_slots.tolist() == [8, 9, 10]
    assert md.last_page_len.tolist() == [3]


def test_popn_across_page_boundaries():
    h = Harness(num_pages=32, page_size=8)
    s = h.add()
    h.forward([s], [41])
    for n in (1, 0, 8, 7, 9, 16):  # 40 (boundary), 40, 32, 25, 16 (boundary), 0
        h.popn(s, n)
        h.check()
        h.forward([s], [1])
        h.check()
        h.popn(s, 1)
        h.check()
    assert h.pm.num_used_pages == 0
    with pytest.raises(UserError, match=r"n must be in \[0, 0\]"):
        h.pm.popn(s, 1)


def test_fork_refcounts_and_copy_on_write():
    h = Harness(num_pages=32, page_size=4)
    parent = h.add()
    h.forward([parent], [8])
    child = h.fork(parent)  # length 8: both pages shared, nothing to copy
    assert h.pm.sequence_pages(child).tolist() == h.pm.sequence_pages(parent).tolist()
    assert h.pm.num_used_pages == 2
    h.popn(child, 1)  # child's last page is now partial and still shared
    md = h.forward([child], [1])
    assert len(md.copy_pages) == 1 and md.copy_pages[0, 0] == h.pm.sequence_pages(parent)[1]
    h.check()
    grandchild = h.fork(child)  # child is at 8 again: shares both, no copy
    h.forward([parent, child, grandchild], [3, 2, 1])
    h.check()
    used = h.pm.num_used_pages
    h.remove(parent)  # page 0 is still held by child and grandchild
    assert h.pm.num_used_pages == used - 2
    h.check()
    h.remove(child)
    h.remove(grandchild)
    h.check()
    assert h.pm.num_used_pages == 0


def test_cache_full_changes_nothing():
    h = Harness(num_pages=6, page_size=4)
    a, b = h.add(), h.add()
    h.forward([a, b], [9, 2])  # a: 3 pages, b: 1 page, 2 free
    before = h.snapshot()
    with pytest.raises(KVCacheFull, match="begin_forward needs 3 free pages, 2 are free"):
        h.pm.begin_forward([b, a], [3, 9])  # b alone would fit (1 page), a needs 2 more
    assert h.snapshot() == before
    h.forward([a, b], [7, 5])  # a 16 tokens, b 7: exactly the 2 free pages
    assert h.pm.num_free_pages == 0
    before = h.snapshot()
    with pytest.raises(KVCacheFull, match="needs 1 free pages, 0 are free"):
        h.pm.begin_forward([a], [1])
    with pytest.raises(KVCacheFull, match="fork_sequence needs 1 free page"):
        h.pm.fork_sequence(b, 99)  # b's last page is partial: the fork must copy it
    assert h.snapshot() == before
    h.check()


def test_fork_needs_a_page_only_for_a_partial_last_page():
    h = Harness(num_pages=3, page_size=4)
    a, b = h.add(), h.add()
    h.forward([a, b], [4, 5])
    child = h.fork(a)  # 4 tokens: shares its one page, needs none
    assert h.pm.num_free_pages == 0
    before = h.snapshot()
    with pytest.raises(KVCacheFull, match="fork_sequence needs 1 free page"):
        h.pm.fork_sequence(b, 100)
    assert h.snapshot() == before
    h.check()
    assert h.pm.sequence_length(child) == 4


def test_buffers_grow_past_their_first_size():
    """A prefill longer than the token buffers and forks listing more pages than exist."""
    h = Harness(num_pages=700, page_size=16, max_batch=16)
    s = h.add()
    h.forward([s], [10000])
    h.check()
    children = [h.fork(s) for _ in range(15)]  # 10000 = 625 full pages, all shared
    md = h.forward([s, *children], [1] * 16)
    assert md.page_indptr[-1] == 16 * 626 > 700
    h.check()


def test_user_errors():
    pm = PageManager(num_pages=8, page_size=4, max_batch=2)
    pm.add_sequence(1)
    pm.add_sequence(2)
    cases = [
        (lambda: pm.add_sequence(1), "sequence 1 already exists"),
        (lambda: pm.remove_sequence(7), "unknown sequence id 7"),
        (lambda: pm.popn(7, 1), "unknown sequence id 7"),
        (lambda: pm.popn(1, -1), r"n must be in \[0, 0\]"),
        (lambda: pm.sequence_length(7), "unknown sequence id 7"),
        (lambda: pm.fork_sequence(7, 3), "unknown sequence id 7"),
        (lambda: pm.fork_sequence(1, 2), "fork target 2 already exists"),
        (lambda: pm.begin_forward([1, 7], [1, 1]), "unknown sequence id 7"),
        (lambda: pm.begin_forward([1, 1], [1, 1]), "sequence 1 is listed twice"),
        (lambda: pm.begin_forward([1, 2], [1, -3]), "append length -3 of sequence 2"),
        (lambda: pm.begin_forward([1, 2], [0, 1]), "append length 0 of sequence 1"),
        (lambda: pm.begin_forward([1, 2], [1]), "2 seq_ids but 1 append_lengths"),
        (lambda: pm.begin_forward([], []), "got 0 sequences"),
        (lambda: pm.begin_forward([1, 2, 3], [1, 1, 1]), r"1 to 2 \(max_batch\)"),
        (lambda: pm.begin_forward([1, 2], [1.5, 1]), "integer seq_ids and append_lengths"),
        (lambda: pm.add_sequence(1.0), "seq_id must be an integer"),
        (lambda: PageManager(0), "num_pages must be at least 1"),
        (lambda: PageManager(8, page_size=0), "page_size must be at least 1"),
        (lambda: PageManager(8, max_batch=0), "max_batch must be at least 1"),
        (lambda: PageManager(2**28, page_size=16), "below 2\\*\\*31"),
        (lambda: PageManager.pages_for_budget(1 << 30, 2, 2, 64, 3), "3-bit KV cache is not supported"),
        (lambda: PageManager.pages_for_budget(-1, 2, 2, 64, 4), "budget_bytes must not be negative"),
        (lambda: PageManager.pages_for_budget(1 << 30, 0, 2, 64, 4), "num_layers must be at least 1"),
    ]
    for call, message in cases:
        with pytest.raises(UserError, match=message) as err:
            call()
        assert type(err.value) is UserError and "\n" not in str(err.value)
    assert pm.num_free_pages == 8 and pm.sequence_length(1) == pm.sequence_length(2) == 0


def test_pages_for_budget():
    """Bytes of one (token, KV head) row of K or V, per the page layout of tir_kernels.kv_attention:
    D * bits / 8 code bytes plus a float16 (scale, zero) pair at 4 and 8 bits, D float16 at 16."""
    from tir_kernels import kv_attention

    assert DEFAULT_PAGE_SIZE == kv_attention.PAGE_SIZE
    row_bytes = {(4, 64): 36, (8, 64): 68, (16, 64): 128, (4, 128): 68, (8, 128): 132, (16, 128): 256}
    for (kv_bits, head_dim), row in row_bytes.items():
        page_bytes = 32 * 2 * 8 * 16 * row  # 32 layers, K and V, 8 KV heads, 16 tokens
        budget = 1000 * page_bytes + page_bytes - 1
        assert PageManager.pages_for_budget(budget, 32, 8, head_dim, kv_bits) == 1000
        assert PageManager.pages_for_budget(budget + 1, 32, 8, head_dim, kv_bits) == 1001
    # Llama-2-7B (32 layers, 32 KV heads, D = 128) in 40 GiB: INT4 pages hold 3.76x the tokens of FP16.
    int4 = PageManager.pages_for_budget(40 << 30, 32, 32, 128, 4)
    assert int4 == 19275 and PageManager.pages_for_budget(40 << 30, 32, 32, 128, 16) == 5120
    assert PageManager.pages_for_budget(1 << 20, 2, 2, 64, 4, page_size=1) == (1 << 20) // (2 * 2 * 2 * 36)


@pytest.mark.parametrize("page_size, seed", [(1, 0), (4, 1), (16, 2)])
def test_random_operations_against_reference(page_size, seed):
    rng = random.Random(seed)
    h = Harness(num_pages=48, page_size=page_size, max_batch=8)
    live: list[int] = []
    for _ in range(1500):
        op = rng.random()
        if op < 0.1 or not live:
            live.append(h.add())
        elif op < 0.2 and len(live) > 1:
            h.remove(live.pop(rng.randrange(len(live))))
        elif op < 0.3:
            parent = rng.choice(live)
            if h.ref.fork_fits(parent):
                live.append(h.fork(parent))
            else:
                before = h.snapshot()
                with pytest.raises(KVCacheFull):
                    h.pm.fork_sequence(parent, 10**6)
                assert h.snapshot() == before
        elif op < 0.45:
            s = rng.choice(live)
            h.popn(s, rng.randint(0, len(h.ref.tokens[s])))
        elif op < 0.5:
            before = h.snapshot()
            s = rng.choice(live)
            bad = rng.choice([([s, s], [1, 1]), ([s, 10**7], [1, 1]), ([s], [0]), ([s], [-2])])
            with pytest.raises(UserError):
                h.pm.begin_forward(*bad)
            assert h.snapshot() == before
        else:
            batch = rng.sample(live, rng.randint(1, min(8, len(live))))
            lengths = [rng.choice([1, 1, 1, rng.randint(1, 3 * page_size)]) for _ in batch]
            if h.ref.pages_needed(batch, lengths) > h.ref.free:
                before = h.snapshot()
                with pytest.raises(KVCacheFull):
                    h.pm.begin_forward(batch, lengths)
                assert h.snapshot() == before
                # Make room the way an engine would: preempt the longest sequence.
                h.remove(live.pop(max(range(len(live)), key=lambda i: len(h.ref.tokens[live[i]]))))
            else:
                h.forward(batch, lengths)
        h.check()


def test_loads_without_tvm():
    """Only tvm_ffi is needed: the library must load under runtime-only TVM."""
    code = ("import sys; from atom_tvm.runtime.kv_pages import PageManager; pm = PageManager(4); "
            "pm.add_sequence(0); pm.begin_forward([0], [3]); assert 'tvm' not in sys.modules, 'tvm imported'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_missing_library_names_the_build_command(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "LIBRARY_PATH", tmp_path / "libatom_tvm_native.so")
    with pytest.raises(UserError, match="cmake -S . -B build"):
        native.library.__wrapped__()
