"""Run a package: load library and weights, keep one conversation's paged KV cache, generate tokens.

Runtime-only: this module imports `tvm.runtime` and never `tvm.relax`, so a GPU host needs only the
TVM runtime libraries (no compiler) to serve a package built elsewhere.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import tvm
import tvm_ffi
from tvm.runtime.vm import VirtualMachine

from atom_tvm import package
from atom_tvm.errors import UserError
from atom_tvm.runtime.kv_cache import open_kv_cache
from atom_tvm.runtime.tvm_libs import load_runtime_cuda

_SEQ_ID = 0  # the chat runtime holds one conversation; batching comes with the serving engine


@dataclasses.dataclass
class GenerationConfig:
    temperature: float = 0.7  # 0 means greedy
    top_p: float = 0.95
    max_tokens: int = 256
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()


def load_device(name: str) -> tvm.runtime.Device:
    """The TVM device for 'cpu' or 'cuda', loading the CUDA runtime library if TVM did not."""
    if name == "cpu":
        return tvm.cpu(0)
    if name != "cuda":
        raise UserError(f"--device {name!r}: choose cpu or cuda")
    if tvm_ffi.get_global_func("device_api.cuda", allow_missing=True) is None:
        try:
            load_runtime_cuda()
        except (OSError, RuntimeError) as err:
            raise UserError(f"cannot load TVM's CUDA runtime ({err}); is there an NVIDIA driver?") from None
    dev = tvm.cuda(0)
    if not dev.exist:
        raise UserError("no CUDA GPU visible; run with --device cpu and a package built with --target llvm")
    return dev


def sample_token(probs: np.ndarray, top_p: float, rng: np.random.Generator) -> int:
    """Nucleus sampling: draw from the smallest set of tokens whose probability reaches top_p."""
    order = np.argsort(-probs, kind="stable")
    sorted_probs = probs[order].astype(np.float64)
    cumulative = np.cumsum(sorted_probs)
    keep = int(np.searchsorted(cumulative, top_p * cumulative[-1])) + 1
    kept = sorted_probs[:keep] / sorted_probs[:keep].sum()
    return int(order[rng.choice(keep, p=kept)])


class PackageFiles:
    """What every process running a package reads first: its directory, config and tokenizer."""

    def __init__(self, package_dir: str | Path, device: str):
        self.package_dir = Path(package_dir)
        if not self.package_dir.is_dir():
            raise UserError(f"{self.package_dir}: package directory not found; build one with python -m atom_tvm.build")
        self.config = package.read_chat_config(self.package_dir)
        self.lib_path = self.package_dir / self.config.get("model_lib", "")
        if not self.lib_path.is_file():
            raise UserError(f"{self.lib_path}: model library missing; rebuild the package")
        if (self.config.get("target") == "cuda") != (device == "cuda"):
            raise UserError(f"{self.package_dir} was built for --target {self.config.get('target')}; "
                            f"run it with --device {'cuda' if self.config.get('target') == 'cuda' else 'cpu'}")
        self.tensor_parallel_shards = int(self.config.get("tensor_parallel_shards", 1))
        self.context_window_size = int(self.config["context_window_size"])
        self.prefill_chunk_size = int(self.config["prefill_chunk_size"])
        self.tokenizer = self._load_tokenizer()
        eos = self.config["eos_token_id"]
        self.eos_token_ids = tuple(eos) if isinstance(eos, list) else (eos,)

    def _load_tokenizer(self):
        from tokenizers import Tokenizer

        path = self.package_dir / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"{path}: missing; rebuild the package")
        return Tokenizer.from_file(str(path))


class LoadedPackage(PackageFiles):
    """A package's library, weights, tokenizer and config, loaded on one device (no KV cache).

    A tensor-parallel package is loaded by `atom_tvm.runtime.sharded.ShardedPackage`, whose workers
    each hold a ``LoadedPackage`` of their ``shard`` on their own GPU (``device`` then being a TVM
    device rather than a name)."""

    def __init__(self, package_dir: str | Path, device: str | tvm.runtime.Device = "cpu",
                 make_param: Callable[[str, tuple, str], tvm.runtime.Tensor] | None = None,
                 shard: int | None = None):
        """``make_param(name, shape, dtype)``, for benchmarks of libraries built without weights, makes
        each parameter on the device instead of reading the package's tensor cache."""
        named = isinstance(device, str)
        super().__init__(package_dir, device if named else "cuda" if device.dlpack_device_type() == 2 else "cpu")
        if shard is None and self.tensor_parallel_shards > 1:
            raise UserError(f"{self.package_dir} is split over {self.tensor_parallel_shards} GPUs; load it with "
                            "atom_tvm.runtime.open_package (chat, serve and eval do)")
        self.device = load_device(device) if named else device
        self.vm = VirtualMachine(tvm.runtime.load_module(str(self.lib_path)), self.device)
        self.metadata = json.loads(self.vm["_metadata"]())
        expected = [(p["name"], tuple(p["shape"]), p["dtype"]) for p in self.metadata["params"]]
        if make_param is None:
            weights_dir = self.package_dir if shard is None else self.package_dir / package.tensor_parallel_dir(shard)
            arrays = package.load_tensor_cache(weights_dir, expected)
            self.params = [tvm.runtime.tensor(arrays[name], self.device) for name, _, _ in expected]
        else:
            self.params = [make_param(name, shape, dtype) for name, shape, dtype in expected]
        self.dtype = self.metadata["kv_cache"]["dtype"]
        self.hidden_size = self.metadata["hidden_size"]
        self.fns = {name: self.vm[name] for name in ("embed", "prefill", "decode", "batch_prefill",
                                                      "batch_decode", "softmax_with_temperature")}

    def open_kv_cache(self, max_batch: int, max_total_tokens: int):
        """A fresh KV cache for up to ``max_batch`` sequences holding ``max_total_tokens`` tokens."""
        return open_kv_cache(self.vm, self.device, self.metadata, max_batch=max_batch,
                             max_total_tokens=max_total_tokens, prefill_chunk=self.prefill_chunk_size)

    def embed(self, token_ids, rows: int = 1) -> tvm.runtime.Tensor:
        """Embeddings of ``token_ids`` as ``[rows, len / rows, hidden]`` (the entry points' input)."""
        ids = tvm.runtime.tensor(np.asarray(token_ids, dtype="int32"), self.device)
        embed = self.fns["embed"](ids, self.params)
        return embed._create_view(tvm_ffi.Shape([rows, len(token_ids) // rows, self.hidden_size]))

    def forward(self, fn: str, token_ids, kv_arg, rows: int = 1, logit_positions=None) -> tvm.runtime.Tensor:
        """Entry point ``fn`` (prefill, decode, batch_prefill, batch_decode) on ``token_ids`` laid out as
        ``rows`` rows, with this step's ``kv_arg`` (`KVCache.begin_forward`); float32 logits
        ``[rows, positions, vocab]`` on the device (``batch_prefill``: at ``logit_positions``)."""
        extra = ()
        if logit_positions is not None:
            extra = (tvm.runtime.tensor(np.asarray(logit_positions, dtype="int32"), self.device),)
        logits, _ = self.fns[fn](self.embed(token_ids, rows), *extra, kv_arg, self.params)
        return logits

    def probs(self, logits: tvm.runtime.Tensor, temperatures) -> np.ndarray:
        """Softmax of ``logits [B, 1, vocab]`` at one temperature per row, on the device; [B, vocab]."""
        temps = tvm.runtime.tensor(np.asarray(temperatures, dtype="float32"), self.device)
        probs = self.fns["softmax_with_temperature"](logits, temps).numpy()
        return probs.reshape(probs.shape[0], -1)


def tensor_parallel_shards(package_dir: str | Path) -> int:
    """How many GPUs a package is split over, from its config alone (1 when the directory is not a
    package: loading it then says what is wrong)."""
    if not Path(package_dir).is_dir():
        return 1
    return int(package.read_chat_config(package_dir).get("tensor_parallel_shards", 1))


def open_package(package_dir: str | Path, device: str = "cpu"):
    """The package loaded for running: a `LoadedPackage` on one device, or for a tensor-parallel package
    a `ShardedPackage` over as many GPUs (or, on the CPU, worker threads) as it has shards. Both run
    `forward` and `probs` and open KV caches alike."""
    if tensor_parallel_shards(package_dir) == 1:
        return LoadedPackage(package_dir, device)
    from atom_tvm.runtime.sharded import ShardedPackage

    return ShardedPackage(package_dir, device)


class ChatModel:
    """One package loaded on one device (or its shards' GPUs), with one conversation's KV cache."""

    def __init__(self, package_dir: str | Path, device: str = "cpu"):
        self.model = model = open_package(package_dir, device)
        self.config, self.tokenizer, self.metadata = model.config, model.tokenizer, model.metadata
        self.context_window_size, self.prefill_chunk_size = model.context_window_size, model.prefill_chunk_size
        self.kv_cache = self.model.open_kv_cache(max_batch=1, max_total_tokens=self.context_window_size)
        self._num_cached = 0
        # The last token `generate` yielded is part of the conversation but not yet in the cache:
        # it is fed at the start of the next `generate` (or dropped by `reset`).
        self._pending: list[int] = []
        self.kv_cache.add_sequence(_SEQ_ID)
        self.stats = {"prefill_tokens": 0, "prefill_seconds": 0.0, "decode_tokens": 0, "decode_seconds": 0.0}

    @property
    def num_cached_tokens(self) -> int:
        """Tokens of the current conversation, including the last generated one not yet fed."""
        return self._num_cached + len(self._pending)

    def reset(self) -> None:
        self.kv_cache.remove_sequence(_SEQ_ID)
        self.kv_cache.add_sequence(_SEQ_ID)
        self._num_cached = 0
        self._pending = []

    def _forward(self, fn: str, token_ids: list[int], *extra) -> tvm.runtime.Tensor:
        """Run `prefill`, `decode` or `batch_prefill` (whose `extra` is the logit positions) on tokens
        appended to the sequence; float32 logits [1, positions, vocab] (on the device, or on the host
        from a sharded package)."""
        kv = self.kv_cache.begin_forward([_SEQ_ID], [len(token_ids)])
        try:
            logits = self.model.forward(fn, token_ids, kv, 1, *extra)
        except BaseException:  # Ctrl-C included: undo the append so the cache matches _num_cached
            self.kv_cache.end_forward()
            self.kv_cache.popn(_SEQ_ID, len(token_ids))
            raise
        self.kv_cache.end_forward()
        self._num_cached += len(token_ids)
        return logits

    def prefill(self, token_ids: list[int]) -> np.ndarray:
        """Append tokens in chunks of at most prefill_chunk_size; logits of the last one (float32)."""
        logits = None
        for start in range(0, len(token_ids), self.prefill_chunk_size):
            logits = self._forward("prefill", token_ids[start:start + self.prefill_chunk_size])
        return logits

    def prefill_every_position(self, token_ids: list[int]) -> np.ndarray:
        """Append tokens like `prefill`, returning float32 logits [n, vocab] at every position
        (perplexity): `batch_prefill` with logit positions 0..chunk-1 for each chunk."""
        rows = []
        for start in range(0, len(token_ids), self.prefill_chunk_size):
            chunk = token_ids[start:start + self.prefill_chunk_size]
            rows.append(self._forward("batch_prefill", chunk, np.arange(len(chunk))).numpy()[0])
        return np.concatenate(rows, axis=0)

    def decode(self, token: int) -> tvm.runtime.Tensor:
        """Append one token; float32 logits [1, 1, vocab] of the next."""
        return self._forward("decode", [token])

    def _next_token(self, logits: tvm.runtime.Tensor, gen: GenerationConfig, rng) -> int:
        if gen.temperature <= 0:
            return int(np.argmax(logits.numpy().reshape(-1)))
        probs = self.model.probs(logits, [gen.temperature])[0]
        return sample_token(probs, gen.top_p, rng)

    def check_fits(self, n_new: int) -> None:
        if n_new == 0:
            raise UserError("empty prompt: nothing to generate from")
        used = self.num_cached_tokens
        if used + n_new >= self.context_window_size:
            raise UserError(f"prompt of {n_new} tokens does not fit: {used} of the "
                            f"{self.context_window_size}-token context window are used; /reset or shorten it")

    def generate(self, new_token_ids: list[int], gen: GenerationConfig) -> Iterator[int]:
        """Append `new_token_ids`, then yield sampled tokens until a stop token, max_tokens or a full window."""
        self.check_fits(len(new_token_ids))
        stops = set(gen.stop_token_ids) | set(self.model.eos_token_ids)
        rng = np.random.default_rng(gen.seed)
        stats = {"prefill_tokens": len(new_token_ids), "decode_tokens": 0, "decode_seconds": 0.0}
        t0 = time.perf_counter()
        feed, self._pending = self._pending + list(new_token_ids), []
        token = self._next_token(self.prefill(feed), gen, rng)
        stats["prefill_seconds"] = time.perf_counter() - t0
        self.stats = stats
        for produced in range(1, gen.max_tokens + 1):
            self._pending = [token]
            yield token
            if token in stops or produced == gen.max_tokens or self._num_cached >= self.context_window_size:
                break
            t0 = time.perf_counter()
            logits = self.decode(token)
            self._pending = []
            token = self._next_token(logits, gen, rng)
            stats["decode_seconds"] += time.perf_counter() - t0
            stats["decode_tokens"] += 1
