"""Continuous batching: many requests share one loaded package and one paged KV cache.

Orca-style iteration-level scheduling. The engine runs one forward *step* at a time; between two
steps finished and cancelled requests leave (their pages are freed) and waiting ones join. A step
feeds at most ``max_step_tokens`` new tokens (the package's prefill chunk, the most one call of an
entry point takes) of at most ``max_batch`` sequences, picked in this order:

1. every running request that is decoding gets its one token, oldest first;
2. running requests still in their prompt get chunks from what is left of the step, oldest first;
3. waiting requests join first come, first served, while a sequence slot, step tokens and free
   pages for their whole prompt remain (the first one that does not fit stops the queue).

A step of decode tokens only runs ``batch_decode`` (``decode`` for a single sequence); any other
step runs ``batch_prefill`` over the ragged sequences (prompt chunks and decode tokens alike) with a
logit at each one's last token.

KV pages: each step is planned with ``ceil(n / page_size)`` pages for a sequence's ``n`` new tokens
(its last page may have room, so this never falls short: TVM's cache checks exactly this bound and
Atom's needs no more), so ``begin_forward`` is never refused. A running request that cannot get a
page preempts the newest running requests, itself last: they free their pages, go back to the
front of the queue, and recompute their tokens (prompt and output so far) when they rejoin; what
they streamed stays valid. A request whose prompt plus ``max_tokens`` does not fit the context
window, or the whole cache, is rejected when submitted, so the oldest request always makes
progress and every admitted request completes.

Threads: `Engine.submit` and `Engine.cancel` may be called from any thread; steps run in the
engine's own thread (`Engine.start`) or in the caller's (`Engine.step`, `Engine.generate`).
Outputs are handed to a callback in the stepping thread, or queued on the request's handle.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import queue
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import tvm_ffi

from atom_tvm.errors import UserError
from atom_tvm.runtime.engine import GenerationConfig, LoadedPackage, sample_token
from atom_tvm.runtime.kv_cache import page_size_of
from atom_tvm.runtime.kv_pages import PageManager

if TYPE_CHECKING:
    from atom_tvm.runtime.sharded import ShardedPackage

__all__ = ["SamplingParams", "RequestOutput", "Completion", "RequestHandle", "Engine", "TextStream", "kv_budget_pages",
           "STEP_SECONDS_BUCKETS"]

log = logging.getLogger(__name__)

_REPLACEMENT_CHAR = "\ufffd"
#: Prompt tokens decoded before the first output token, so that it keeps its leading space.
_DETOKENIZE_CONTEXT = 6
#: Upper bounds (seconds) of the step-time histogram the metrics keep.
STEP_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclasses.dataclass
class SamplingParams(GenerationConfig):
    """A request's sampling: the chat runtime's settings plus stop strings.

    ``stop_token_ids`` add to the package's EOS ids (which always stop); ``stop`` strings end the
    output where they first occur, and neither they nor anything after them is ever emitted.
    """

    stop: tuple[str, ...] = ()

    def check(self) -> None:
        """UserError naming the first bad field."""
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise UserError(f"temperature={self.temperature!r}: must be a number >= 0 (0 means greedy)")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise UserError(f"top_p={self.top_p!r}: must be in (0, 1]")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise UserError(f"max_tokens={self.max_tokens!r}: must be an integer >= 1")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise UserError(f"seed={self.seed!r}: must be an integer >= 0")
        if any(isinstance(t, bool) or not isinstance(t, int) for t in self.stop_token_ids):
            raise UserError(f"stop_token_ids={self.stop_token_ids!r}: must be integers")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise UserError(f"stop={self.stop!r}: stop strings must be non-empty strings")


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    """One update of a request: what it produced since the previous update.

    ``finish_reason`` is None until the last update, then "stop" (a stop token or string),
    "length" (max_tokens), "abort" (cancelled) or "error" (``error`` says why).
    """

    request_id: int
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    error: str | None = None


@dataclasses.dataclass
class Completion:
    """A finished request: every token it generated (a final stop token included) and its text
    (stop token and stop string excluded)."""

    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    error: str | None = None


def _pending_stop_length(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop string: it may
    become a stop string with the next token, so it is not emitted yet."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


class TextStream:
    """Incremental detokenization of one request's output, cut at its first stop string.

    Tokenizers join pieces context-dependently (a SentencePiece decoder drops the leading space of
    the first token it sees, a character may be spread over several byte tokens), so each new token
    is decoded together with the tokens before it since the last complete piece (at first the
    prompt's last few tokens, ``context``), and only the text past what those decoded to is new; a
    piece ending in an incomplete character (U+FFFD) waits for the next token, and is given out as
    it is only when the output ends there.
    """

    def __init__(self, tokenizer, stops: tuple[str, ...] = (), context: list[int] = ()):
        self.tokenizer, self.stops = tokenizer, tuple(stops)
        self._ids: list[int] = list(context)
        self.text = ""
        self.stopped = False  # a stop string was found: `text` ends where it began
        self._emitted = 0  # characters of `text` already handed out
        self._prefix, self._read = 0, len(self._ids)  # _ids[_prefix:_read] decoded to the text before the new piece
        self._longest_stop = max((len(s) for s in self.stops), default=0)

    def _new_piece(self) -> str:
        before = self.tokenizer.decode(self._ids[self._prefix:self._read], skip_special_tokens=True)
        after = self.tokenizer.decode(self._ids[self._prefix:], skip_special_tokens=True)
        return after[len(before):] if len(after) > len(before) else ""

    def _append(self, piece: str) -> None:
        start = max(0, len(self.text) - self._longest_stop + 1)
        self.text += piece
        self._prefix, self._read = self._read, len(self._ids)
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True

    def push(self, token: int) -> bool:
        """Add a generated token; True when the text now contains a stop string (it is cut there)."""
        self._ids.append(token)
        piece = self._new_piece()
        if piece and not piece.endswith(_REPLACEMENT_CHAR):
            self._append(piece)
        return self.stopped

    def take(self, final: bool = False) -> str:
        """Text not handed out yet: unless ``final``, less a tail that may start a stop string."""
        if final and not self.stopped and self._read < len(self._ids):
            self._append(self._new_piece())
        end = len(self.text) if final else len(self.text) - _pending_stop_length(self.text, self.stops)
        new = self.text[self._emitted:end]
        self._emitted = max(self._emitted, end)
        return new


class _Request:
    """Engine-side state of one request; touched only by the stepping thread once submitted."""

    def __init__(self, request_id: int, prompt: list[int], params: SamplingParams, stop_ids: frozenset[int],
                 tokenizer, deliver: Callable[[RequestOutput], None]):
        self.id = request_id
        self.prompt = prompt
        self.params = params
        self.stop_ids = stop_ids
        self.deliver = deliver
        self.tokens = list(prompt)  # prompt + generated: what the KV sequence stands for
        self.generated: list[int] = []
        self.num_cached = 0  # tokens of `tokens` in the KV cache
        self.in_cache = False  # holds a KV sequence
        self.rng = np.random.default_rng(params.seed)
        self.text = TextStream(tokenizer, params.stop, context=prompt[-_DETOKENIZE_CONTEXT:])

    @property
    def num_uncached(self) -> int:
        return len(self.tokens) - self.num_cached


class RequestHandle:
    """What `Engine.submit` returns. Without an ``on_output`` callback, the request's outputs
    queue up here: iterate over them (blocking) or wait for `result`."""

    def __init__(self, engine: "Engine", request_id: int, prompt: list[int]):
        self.engine, self.request_id, self.prompt = engine, request_id, prompt
        self._outputs: queue.Queue[RequestOutput] = queue.Queue()

    def cancel(self) -> None:
        self.engine.cancel(self.request_id)

    def __iter__(self) -> Iterator[RequestOutput]:
        while True:
            out = self._outputs.get()
            yield out
            if out.finish_reason is not None:
                return

    def result(self) -> Completion:
        """Block until the request finishes; its whole output."""
        tokens, text = [], []
        for out in self:
            tokens.extend(out.token_ids)
            text.append(out.text)
        return Completion(self.request_id, list(self.prompt), tokens, "".join(text), out.finish_reason, out.error)


def kv_budget_pages(metadata: dict, budget_bytes: int) -> int:
    """Pages (every layer's K and V for ``page_size`` tokens) of the package's KV cache that fit
    in ``budget_bytes``."""
    layout = metadata["kv_cache"]
    page_size = page_size_of(metadata)
    layers, kv_heads, head_dim = layout["num_hidden_layers"], layout["num_key_value_heads"], layout["head_dim"]
    if layout.get("kind", "tvm") == "atom":
        return PageManager.pages_for_budget(budget_bytes, layers, kv_heads, head_dim, int(layout["bits"]), page_size)
    page_bytes = layers * 2 * kv_heads * page_size * head_dim * np.dtype(layout["dtype"]).itemsize
    return budget_bytes // page_bytes


class Engine:
    """Continuous batching over ``package`` for up to ``max_batch`` sequences at a time, with a KV
    cache of ``kv_tokens`` tokens or of what fits in ``kv_bytes`` bytes (the smaller, if both)."""

    def __init__(self, package: LoadedPackage | ShardedPackage, max_batch: int = 32, kv_tokens: int | None = None,
                 kv_bytes: int | None = None):
        self.package = package
        self.tokenizer = package.tokenizer
        self.context_window_size = package.context_window_size
        self.max_step_tokens = package.prefill_chunk_size
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise UserError(f"max_batch={max_batch!r}: must be an integer >= 1")
        if max_batch > self.max_step_tokens:
            raise UserError(f"max_batch {max_batch} exceeds the package's prefill chunk of {self.max_step_tokens} "
                            "tokens, the most one step feeds; lower it or rebuild with a larger --prefill-chunk-size")
        self.max_batch = max_batch
        page_size = page_size_of(package.metadata)
        budgets = []
        if kv_tokens is not None:
            if kv_tokens < 1:
                raise UserError(f"a KV budget of {kv_tokens} tokens: must be at least 1")
            budgets.append(kv_tokens)
        if kv_bytes is not None:
            pages = kv_budget_pages(package.metadata, kv_bytes)
            # The cache adds one page per sequence to the pages of its tokens (open_kv_cache).
            if pages <= max_batch:
                raise UserError(f"a KV budget of {kv_bytes} bytes holds {pages} pages of {page_size} tokens; "
                                f"max_batch {max_batch} needs more than {max_batch}: raise the budget or lower "
                                "max_batch")
            budgets.append((pages - max_batch) * page_size)
        if not budgets:
            raise UserError("give the KV cache budget in tokens or bytes (kv_tokens, kv_bytes)")
        kv_tokens = min(budgets)
        self.kv = package.open_kv_cache(max_batch=max_batch, max_total_tokens=kv_tokens)
        self.page_size = self.kv.page_size
        self._free_when_empty = self.kv.num_free_pages()
        self.eos_token_ids = frozenset(package.eos_token_ids)
        self.vocab_size = int(package.config["model_config"]["vocab_size"])  # rows of the embedding

        self._waiting: collections.deque[_Request] = collections.deque()
        self._running: list[_Request] = []  # admission order: oldest first
        self._lock = threading.Condition()  # guards _inbox, _cancels, _next_id, _stopping, _metrics
        self._inbox: list[_Request] = []
        self._cancels: set[int] = set()
        self._next_id = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._step_lock = threading.Lock()  # one step at a time, whichever thread runs it
        self._outbox: list[tuple[_Request, RequestOutput]] = []  # outputs of the current step
        self._metrics = {
            "requests_submitted": 0, "requests_rejected": 0, "prompt_tokens": 0, "prefill_tokens": 0,
            "generated_tokens": 0, "preemptions": 0, "steps": 0, "step_seconds_sum": 0.0,
            "step_seconds_buckets": [0] * len(STEP_SECONDS_BUCKETS),
            "finished": {"stop": 0, "length": 0, "abort": 0, "error": 0},
            "steps_by_kind": {"decode": 0, "prefill": 0, "mixed": 0},
            "waiting": 0, "running": 0, "batch_size": 0, "kv_pages_used": 0,
        }

    # ----- capacity -----------------------------------------------------------------------

    @property
    def kv_pages_total(self) -> int:
        return self.kv.num_pages

    @property
    def kv_pages_used(self) -> int:
        """Pages the running requests hold (the cache's own count)."""
        return self._free_when_empty - self.kv.num_free_pages()

    def _pages(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    @property
    def max_request_tokens(self) -> int:
        """The most tokens (prompt plus max_tokens) one request may need: the context window, or
        what the cache holds for a sequence alone (one page is kept for the step bound)."""
        return min(self.context_window_size, (self.kv.num_pages - 1) * self.page_size)

    # ----- submission (any thread) --------------------------------------------------------

    def check_request(self, prompt: list[int], params: SamplingParams) -> None:
        """UserError when the request can never run: bad params, an empty prompt, a token id
        outside the vocabulary, or a prompt plus max_tokens larger than the context window or cache."""
        params.check()
        if not prompt:
            raise UserError("empty prompt: nothing to generate from")
        vocab = self.vocab_size
        if any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < vocab for t in prompt):
            raise UserError(f"prompt token ids must be integers in [0, {vocab})")
        need = len(prompt) + params.max_tokens
        if len(prompt) + 1 > self.context_window_size:
            raise UserError(f"prompt of {len(prompt)} tokens does not fit the {self.context_window_size}-token "
                            "context window; shorten it")
        if need > self.context_window_size:
            raise UserError(f"prompt of {len(prompt)} tokens plus max_tokens {params.max_tokens} exceeds the "
                            f"{self.context_window_size}-token context window; lower max_tokens to at most "
                            f"{self.context_window_size - len(prompt)} or shorten the prompt")
        if need > self.max_request_tokens:
            raise UserError(f"prompt of {len(prompt)} tokens plus max_tokens {params.max_tokens} needs more KV "
                            f"cache than the {self.max_request_tokens} tokens one request can have; lower "
                            "max_tokens, shorten the prompt, or serve with a larger KV budget")

    def submit(self, prompt: list[int], params: SamplingParams | None = None,
               on_output: Callable[[RequestOutput], None] | None = None) -> RequestHandle:
        """Queue a request (thread-safe); UserError if it can never run (`check_request`).

        ``on_output`` receives each `RequestOutput`, in the stepping thread (it must not block);
        without it the outputs queue up on the returned handle.
        """
        params = params or SamplingParams()
        try:
            self.check_request(prompt, params)
        except UserError:
            with self._lock:
                self._metrics["requests_rejected"] += 1
            raise
        prompt = [int(t) for t in prompt]
        with self._lock:
            request_id = self._next_id
            self._next_id += 1
            handle = RequestHandle(self, request_id, prompt)
            stop_ids = self.eos_token_ids | frozenset(params.stop_token_ids)
            self._inbox.append(_Request(request_id, prompt, params, stop_ids, self.tokenizer,
                                        on_output or handle._outputs.put))
            self._metrics["requests_submitted"] += 1
            self._metrics["prompt_tokens"] += len(prompt)
            self._lock.notify_all()
        return handle

    def cancel(self, request_id: int) -> None:
        """Stop a request (thread-safe): before the next step it leaves, its pages are freed, and
        its last output says "abort". Unknown or finished requests are ignored."""
        with self._lock:
            self._cancels.add(request_id)
            self._lock.notify_all()

    # ----- running ------------------------------------------------------------------------

    def start(self) -> None:
        """Run steps in a background thread until `stop`."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._serve_forever, name="atom-tvm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the background thread after its current step (requests still queued stay queued)."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            self._stopping = False

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _serve_forever(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not (self._inbox or self._cancels or self._waiting or self._running):
                    self._lock.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as err:  # an engine bug: fail what is in flight rather than hang its clients
                log.exception("engine step failed")
                self._fail_all(f"engine error: {err}")

    def _fail_all(self, message: str) -> None:
        for req in list(self._running) + list(self._waiting):
            self._finish(req, "error", message)
        self._waiting.clear()
        self._flush_outbox()

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._inbox or self._cancels or self._waiting or self._running)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[Completion]:
        """Run requests to completion (synchronous): steps in this thread, or waits for the
        engine's thread if it runs. UserError before anything runs if any request is invalid."""
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise UserError(f"generate got {len(prompts)} prompts but {len(params_list)} sampling params")
        for prompt, p in zip(prompts, params_list):
            self.check_request(list(prompt), p)
        handles = [self.submit(list(prompt), p) for prompt, p in zip(prompts, params_list)]
        if not self.is_alive:
            while self.has_work():
                self.step()
        return [h.result() for h in handles]

    def step(self) -> bool:
        """One scheduling iteration and forward; False when there was nothing to run."""
        with self._step_lock:
            t0 = time.perf_counter()
            self._take_inbox()
            plan = self._schedule()
            if plan:
                self._run(plan)
            seconds = time.perf_counter() - t0
            with self._lock:
                m = self._metrics
                if plan:
                    m["steps"] += 1
                    m["batch_size"] = len(plan)
                    m["step_seconds_sum"] += seconds
                    for i, bound in enumerate(STEP_SECONDS_BUCKETS):
                        if seconds <= bound:
                            m["step_seconds_buckets"][i] += 1
            self._flush_outbox()
            return bool(plan)

    def _flush_outbox(self) -> None:
        """Update the gauges, then hand out the step's outputs: a client that has its last output
        sees metrics that already count its request as finished."""
        with self._lock:
            m = self._metrics
            m["waiting"], m["running"] = len(self._waiting) + len(self._inbox), len(self._running)
            m["kv_pages_used"] = self.kv_pages_used
        outbox, self._outbox = self._outbox, []
        for req, out in outbox:
            try:
                req.deliver(out)
            except Exception:  # a consumer that went away must not stop the other requests
                log.exception("delivering output of request %d failed", req.id)

    def metrics(self) -> dict:
        """A snapshot of the counters and gauges (see serve.py's /metrics for their meaning)."""
        with self._lock:
            snapshot = {k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v)
                        for k, v in self._metrics.items()}
        snapshot["kv_pages_total"] = self.kv_pages_total
        snapshot["kv_page_size"] = self.page_size
        snapshot["max_batch"] = self.max_batch
        return snapshot

    # ----- one step (stepping thread only) -------------------------------------------------

    def _take_inbox(self) -> None:
        with self._lock:
            new, self._inbox = self._inbox, []
            cancels, self._cancels = self._cancels, set()
        self._waiting.extend(new)
        if not cancels:
            return
        for req in [r for r in self._waiting if r.id in cancels]:
            self._waiting.remove(req)
            self._finish(req, "abort")
        for req in [r for r in self._running if r.id in cancels]:
            self._finish(req, "abort")

    def _schedule(self) -> list[tuple[_Request, int]]:
        """(request, new tokens) of the next step, admitting and preempting requests as needed."""
        budget = self.max_step_tokens
        free = self.kv.num_free_pages()
        plan: list[tuple[_Request, int]] = []
        planned: set[int] = set()

        def take(req: _Request, n: int) -> None:
            nonlocal budget, free
            plan.append((req, n))
            planned.add(req.id)
            budget -= n
            free -= self._pages(n)

        # `in_cache` is membership of _running, which preemption changes as we go.
        for req in [r for r in self._running if r.num_uncached == 1]:
            while free == 0 and req.in_cache:
                self._preempt(next(r for r in reversed(self._running) if r.id not in planned))
                free = self.kv.num_free_pages() - sum(self._pages(n) for _, n in plan)
            if req.in_cache:
                take(req, 1)
        for req in [r for r in self._running if r.num_uncached > 1]:
            if budget == 0:
                break
            while free == 0 and not plan and req.in_cache:
                # Nothing else runs this step: make room for the oldest prompt.
                self._preempt(self._running[-1])
                free = self.kv.num_free_pages()
            if free > 0 and req.in_cache:
                take(req, min(req.num_uncached, budget, free * self.page_size))
        while self._waiting and budget > 0 and len(self._running) < self.max_batch:
            req = self._waiting[0]
            if self._pages(len(req.tokens)) > free:
                break
            self._waiting.popleft()
            self.kv.add_sequence(req.id)
            req.in_cache = True
            self._running.append(req)
            take(req, min(req.num_uncached, budget))
        return plan

    def _preempt(self, req: _Request) -> None:
        """Free the request's pages and queue it first; it recomputes its tokens when readmitted."""
        self.kv.remove_sequence(req.id)
        req.in_cache, req.num_cached = False, 0
        self._running.remove(req)
        self._waiting.appendleft(req)
        with self._lock:
            self._metrics["preemptions"] += 1

    def _run(self, plan: list[tuple[_Request, int]]) -> None:
        """Feed the planned tokens, sample for every request whose tokens are all in the cache."""
        pkg = self.package
        ids = [t for req, n in plan for t in req.tokens[req.num_cached:req.num_cached + n]]
        decode_only = all(n == 1 for _, n in plan)
        kv_arg = self.kv.begin_forward([req.id for req, _ in plan], [n for _, n in plan])
        try:
            if decode_only:
                # One sequence takes `decode`, whose static single-token graph runs matrix-vector
                # kernels (2.4x faster than `batch_decode` at batch 1 for SmolLM2 on the CPU).
                fn = "decode" if len(plan) == 1 else "batch_decode"
                logits = pkg.forward(fn, ids, kv_arg, rows=len(plan))
            else:
                ends = np.cumsum([n for _, n in plan], dtype=np.int64) - 1
                logits = pkg.forward("batch_prefill", ids, kv_arg, logit_positions=ends)
        except Exception as err:  # a failed forward leaves these sequences unknown: end them
            self.kv.end_forward()
            log.exception("forward step failed")
            for req, _ in plan:
                self._finish(req, "error", f"the forward step failed: {err}")
            return
        self.kv.end_forward()
        # Decode tokens are single tokens of requests that have output; everything else is
        # prompt (or recomputed output after a preemption).
        decoded = sum(1 for req, n in plan if n == 1 and req.generated and req.num_cached == len(req.tokens) - 1)
        ready = []
        for row, (req, n) in enumerate(plan):
            req.num_cached += n
            if req.num_uncached == 0:
                ready.append((row, req))
        kind = "decode" if decoded == len(plan) else "prefill" if decoded == 0 else "mixed"
        with self._lock:
            self._metrics["prefill_tokens"] += len(ids) - decoded
            self._metrics["generated_tokens"] += len(ready)
            self._metrics["steps_by_kind"][kind] += 1
        if not ready:
            return
        logits = logits._create_view(tvm_ffi.Shape([len(plan), 1, logits.shape[-1]]))
        rows = logits.numpy().reshape(len(plan), -1)
        probs = None
        if any(req.params.temperature > 0 for _, req in ready):
            temps = np.ones(len(plan), dtype="float32")  # rows not sampled: any positive value
            for row, req in ready:
                if req.params.temperature > 0:
                    temps[row] = req.params.temperature
            probs = pkg.probs(logits, temps)
        for row, req in ready:
            if req.params.temperature > 0:
                token = sample_token(probs[row], req.params.top_p, req.rng)
            else:
                token = int(np.argmax(rows[row]))
            self._accept(req, token)

    def _accept(self, req: _Request, token: int) -> None:
        req.tokens.append(token)
        req.generated.append(token)
        reason = None
        if token in req.stop_ids:
            reason = "stop"
        elif req.text.push(token):
            reason = "stop"
        elif len(req.generated) >= req.params.max_tokens:
            reason = "length"
        if reason is not None:
            self._finish(req, reason, new_tokens=[token])
        else:
            self._outbox.append((req, RequestOutput(req.id, (token,), req.text.take(final=False),
                                                    num_prompt_tokens=len(req.prompt),
                                                    num_generated_tokens=len(req.generated))))

    def _finish(self, req: _Request, reason: str, error: str | None = None, new_tokens: list[int] = ()) -> None:
        if req.in_cache:
            self.kv.remove_sequence(req.id)
            req.in_cache = False
            self._running.remove(req)
        with self._lock:
            self._metrics["finished"][reason] += 1
        self._outbox.append((req, RequestOutput(req.id, tuple(new_tokens), req.text.take(final=True), reason,
                                                len(req.prompt), len(req.generated), error)))
