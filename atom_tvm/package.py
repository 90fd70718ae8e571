"""The weight store and config files of a compiled package, in MLC-LLM's layout.

A package directory holds::

    mlc-chat-config.json     model/tokenizer/generation settings (read_chat_config)
    tensor-cache.json        index of every weight: shard, offset, shape, dtype, md5
    params_shard_{i}.bin     raw little-endian tensor bytes, packed in order

A package built with ``--tensor-parallel-shards N`` has no top-level tensor cache: each GPU's share
of the weights is a tensor cache of its own, ``tp-shard-{k}/tensor-cache.json`` and its
``params_shard_{i}.bin`` (k = 0 .. N-1), so a worker reads only its shard's files.

This module needs numpy only (bfloat16 additionally needs ml_dtypes): the runtime-only host
imports it to load weights, and it must not drag in tvm.

Every problem found while reading a package is raised as ``atom_tvm.errors.UserError`` with a
single line that names the offending file and says what to do, because the person who sees it
is running a model, not debugging this module.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from atom_tvm.errors import UserError

# ---------------------------------------------------------------------------------------------
# Names other modules import instead of repeating string literals.
# ---------------------------------------------------------------------------------------------

TENSOR_CACHE = "tensor-cache.json"
CHAT_CONFIG = "mlc-chat-config.json"
#: ``SHARD_PATTERN.format(i)`` is the file name of shard ``i``.
SHARD_PATTERN = "params_shard_{}.bin"
SHARD_RE = re.compile(r"params_shard_(\d+)\.bin")
DEFAULT_SHARD_BYTES = 32 << 20
#: Tensors start at multiples of this inside a shard, so a memory-mapped or DMA'd tensor is
#: aligned for any element type and for vectorised copies.
ALIGNMENT = 64

#: Keys mlc-chat-config.json must have; the runtime reads every one of them.
REQUIRED_CHAT_KEYS = (
    "model_type",
    "quantization",
    "model_config",
    "context_window_size",
    "prefill_chunk_size",
    "conv_template",
    "tokenizer_files",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "temperature",
    "top_p",
)

#: Element types a tensor cache may hold, by the name written in the JSON (numpy's name, which
#: is also TVM's). bfloat16 is resolved lazily through ml_dtypes, see _np_dtype.
SUPPORTED_DTYPES = ("float32", "float16", "bfloat16", "int8", "uint8", "int32", "uint32")

_REBUILD = "rebuild it with python -m atom_tvm.build"


def tensor_parallel_dir(shard: int) -> str:
    """Directory of tensor-parallel shard ``shard``'s tensor cache in a package built with
    ``--tensor-parallel-shards`` (one-shard packages keep theirs at the top)."""
    return f"tp-shard-{shard}"


def shard_name(index: int) -> str:
    """File name of shard ``index`` (``params_shard_{index}.bin``)."""
    return SHARD_PATTERN.format(index)


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def _error(path: Path | str, message: str) -> UserError:
    """A UserError "<path>: <message>", forced onto one line.

    Messages embed text from files (tensor names, parser messages); joining lines here keeps the
    one-line promise even if such text contains a newline.
    """
    return UserError(" ".join(f"{path}: {message}".splitlines()))


def _np_dtype(name: str) -> np.dtype:
    """numpy dtype for a supported dtype name; raises KeyError/ImportError otherwise.

    ml_dtypes is imported only when bfloat16 is actually needed, so float32/int8 packages load
    on hosts without it.
    """
    if name not in SUPPORTED_DTYPES:
        raise KeyError(name)
    if name == "bfloat16":
        import ml_dtypes  # noqa: PLC0415 - optional dependency, only for bfloat16

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _align(offset: int) -> int:
    return (offset + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def _md5() -> "hashlib._Hash":
    # An integrity check, not security: say so, so FIPS-mode Pythons still allow md5.
    return hashlib.md5(usedforsecurity=False)


def _fsync_dir(directory: Path) -> None:
    """Make renames in ``directory`` durable; best effort (not possible on every OS/filesystem)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_file(directory: Path, final_name: str):
    """An open binary temp file next to ``final_name`` (same filesystem, so os.replace is atomic)."""
    return tempfile.NamedTemporaryFile(
        mode="wb", dir=directory, prefix=f".{final_name}.", suffix=".tmp", delete=False
    )


def write_json_atomic(path: Path | str, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` via a temp file and os.replace.

    A reader sees either the old file or the complete new one, never a truncated one.
    NaN/Infinity are refused (ValueError) because they are not JSON and other readers choke.
    """
    path = Path(path)
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_file(path.parent, path.name)
    try:
        with tmp:
            tmp.write(text.encode("utf-8"))
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp.name, path)
    except BaseException:
        Path(tmp.name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _read_json_file(path: Path, what: str) -> Any:
    """Parse ``path`` as JSON, turning every failure into a one-line UserError."""
    if not path.is_file():
        if path.exists():
            raise _error(path, f"is not a regular file; the {what} must be a file, {_REBUILD}")
        raise _error(path, f"missing; the package is incomplete or the directory is wrong, {_REBUILD}")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise _error(path, f"cannot be read ({exc.strerror or exc}); check its permissions") from None
    except UnicodeDecodeError as exc:
        raise _error(path, f"not valid JSON (not UTF-8 at byte {exc.start}); {_REBUILD}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _error(
            path,
            f"not valid JSON (truncated?) at line {exc.lineno} column {exc.colno}: {exc.msg}; {_REBUILD}",
        ) from None


# ---------------------------------------------------------------------------------------------
# Writing the tensor cache
# ---------------------------------------------------------------------------------------------


def _as_little_endian_contiguous(name: str, value: Any) -> np.ndarray:
    """The array as it will be stored: C order, little-endian, supported dtype."""
    arr = np.asarray(value)
    dtype_name = arr.dtype.name
    if dtype_name not in SUPPORTED_DTYPES:
        raise UserError(
            f"tensor {name!r} has dtype {dtype_name}, which a tensor cache cannot hold; "
            f"cast it to one of {', '.join(SUPPORTED_DTYPES)} before packaging"
        )
    if arr.dtype.byteorder == ">":
        # The shard format is little-endian regardless of the host that wrote it.
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    # Not np.ascontiguousarray: it turns a 0-d array into shape (1,).
    return arr if arr.flags.c_contiguous else arr.copy(order="C")


def write_tensor_cache(
    out_dir: Path | str,
    params: Iterable[tuple[str, np.ndarray]],
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> dict:
    """Write ``params`` as ``params_shard_{i}.bin`` files plus ``tensor-cache.json`` in ``out_dir``.

    Tensors are packed in the order given, each at a 64-byte aligned offset. A new shard starts
    when the next tensor would end past ``shard_bytes``, unless the current shard is still empty
    (so a tensor larger than ``shard_bytes`` gets a shard of its own).

    All shards are written to temp files first and only renamed into place once every tensor has
    been written, so an exception from ``params`` (e.g. a failing converter) leaves an existing
    package untouched. The old index is removed before the renames and the new one written last:
    a crash in between leaves a package without ``tensor-cache.json``, which reads as "incomplete",
    never as an old index silently describing new shards. Shards of an older, larger package that
    the new index does not reference are deleted at the end.

    Returns the dict written to ``tensor-cache.json``.
    """
    if not isinstance(shard_bytes, int) or shard_bytes <= 0:
        raise UserError(f"shard_bytes must be a positive integer, got {shard_bytes!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    shards: list[dict] = []  # finished shard records, in order
    temps: list[str] = []  # temp file per finished or open shard, same order
    seen: set[str] = set()
    total_bytes = 0
    total_elems = 0

    current = None  # open temp file of the shard being filled
    cur_hash = None
    cur_records: list[dict] = []
    cur_size = 0

    def close_shard() -> None:
        nonlocal current
        current.flush()
        os.fsync(current.fileno())
        current.close()
        current = None
        shards.append(
            {
                "dataPath": shard_name(len(shards)),
                "format": "raw-shard",
                "nbytes": cur_size,
                "records": cur_records,
                "md5sum": cur_hash.hexdigest(),
            }
        )

    try:
        for name, value in params:
            if not isinstance(name, str) or not name:
                raise UserError(f"tensor name {name!r} is not a non-empty string; fix the converter")
            if name in seen:
                raise UserError(f"tensor {name!r} is given twice; fix the converter")
            seen.add(name)
            arr = _as_little_endian_contiguous(name, value)

            offset = _align(cur_size)
            if current is not None and cur_records and offset + arr.nbytes > shard_bytes:
                close_shard()
            if current is None:
                current = _temp_file(out_dir, shard_name(len(shards)))
                temps.append(current.name)
                cur_hash, cur_records, cur_size, offset = _md5(), [], 0, 0

            padding = b"\0" * (offset - cur_size)
            # A uint8 view writes the bytes without copying the (possibly large) tensor.
            data = memoryview(arr.reshape(-1).view(np.uint8))
            for chunk in (padding, data):
                current.write(chunk)
                cur_hash.update(chunk)
            cur_records.append(
                {
                    "name": name,
                    "shape": [int(d) for d in arr.shape],
                    "dtype": arr.dtype.name,
                    "format": "raw",
                    "nbytes": int(arr.nbytes),
                    "byteOffset": offset,
                }
            )
            cur_size = offset + arr.nbytes
            total_bytes += arr.nbytes
            total_elems += arr.size
        if current is not None:
            close_shard()

        index = {
            "metadata": {
                "ParamSize": len(seen),
                "ParamBytes": total_bytes,
                # MLC's definition: stored bits per weight element (e.g. ~4.x for q4 packages).
                "BitsPerParam": total_bytes * 8.0 / total_elems if total_elems else 0.0,
            },
            "records": shards,
        }
        (out_dir / TENSOR_CACHE).unlink(missing_ok=True)
        for i, tmp in enumerate(temps):
            os.replace(tmp, out_dir / shard_name(i))
        temps = []
        write_json_atomic(out_dir / TENSOR_CACHE, index)
    except BaseException:
        if current is not None:
            current.close()
        for tmp in temps:
            Path(tmp).unlink(missing_ok=True)
        raise

    for stale in out_dir.iterdir():
        match = SHARD_RE.fullmatch(stale.name)
        if match and int(match.group(1)) >= len(shards):
            stale.unlink(missing_ok=True)
    return index


# ---------------------------------------------------------------------------------------------
# Reading the tensor cache
# ---------------------------------------------------------------------------------------------


def _get(obj: Any, key: str, types: type, where: str, path: Path) -> Any:
    """``obj[key]`` checked for presence and type, else a UserError about ``path``."""
    if not isinstance(obj, dict) or key not in obj:
        raise _error(path, f"{where} has no {key!r}; the index is damaged, {_REBUILD}")
    value = obj[key]
    # bool is an int subclass, but true/false is never a valid size, name or list here.
    if not isinstance(value, types) or isinstance(value, bool):
        raise _error(path, f"{where}: {key!r} is {value!r}, not a valid value; the index is damaged, {_REBUILD}")
    return value


def _get_size(obj: Any, key: str, where: str, path: Path) -> int:
    value = _get(obj, key, int, where, path)
    if value < 0:
        raise _error(path, f"{where}: {key!r} is negative ({value}); the index is damaged, {_REBUILD}")
    return value


def _parse_index(json_path: Path) -> list[tuple[dict, list[dict]]]:
    """Validate the structure of tensor-cache.json.

    Returns ``[(shard_record, [tensor_record, ...]), ...]`` where every tensor record has been
    checked for consistency (nbytes vs shape*itemsize, extent inside its shard, no overlap, unique
    name, plain-file dataPath) and gained a ``"_dtype"`` entry holding its numpy dtype.
    """
    index = _read_json_file(json_path, "tensor index")
    if not isinstance(index, dict):
        raise _error(json_path, f"top level is {type(index).__name__}, not an object; {_REBUILD}")
    shard_list = _get(index, "records", list, "the index", json_path)

    names: set[str] = set()
    parsed = []
    for si, shard in enumerate(shard_list):
        where = f"records[{si}]"
        data_path = _get(shard, "dataPath", str, where, json_path)
        # The index may only point at files inside the package directory.
        if Path(data_path).name != data_path or data_path in ("", ".", ".."):
            raise _error(json_path, f"{where}: dataPath {data_path!r} is not a file name in the package; {_REBUILD}")
        fmt = _get(shard, "format", str, where, json_path)
        if fmt != "raw-shard":
            raise _error(json_path, f"{where}: shard format {fmt!r} is not supported (only 'raw-shard'); {_REBUILD}")
        shard_size = _get_size(shard, "nbytes", where, json_path)
        tensors = _get(shard, "records", list, where, json_path)

        extents = []
        for ti, rec in enumerate(tensors):
            twhere = f"{where}.records[{ti}]"
            name = _get(rec, "name", str, twhere, json_path)
            twhere = f"tensor {name!r}"
            if name in names:
                raise _error(json_path, f"{twhere} appears twice; the index is damaged, {_REBUILD}")
            names.add(name)
            shape = _get(rec, "shape", list, twhere, json_path)
            if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                raise _error(json_path, f"{twhere} has invalid shape {shape!r}; the index is damaged, {_REBUILD}")
            dtype_name = _get(rec, "dtype", str, twhere, json_path)
            try:
                dtype = _np_dtype(dtype_name)
            except KeyError:
                raise _error(
                    json_path,
                    f"{twhere} has dtype {dtype_name!r}, which this loader cannot read "
                    f"(supported: {', '.join(SUPPORTED_DTYPES)}); {_REBUILD}",
                ) from None
            except ImportError:
                raise _error(
                    json_path, f"{twhere} is bfloat16, which needs the ml_dtypes package; pip install ml_dtypes"
                ) from None
            tfmt = rec.get("format", "raw")
            if tfmt != "raw":
                raise _error(json_path, f"{twhere} has format {tfmt!r}, only 'raw' is supported; {_REBUILD}")
            nbytes = _get_size(rec, "nbytes", twhere, json_path)
            offset = _get_size(rec, "byteOffset", twhere, json_path)
            want = math.prod(shape) * dtype.itemsize
            if nbytes != want:
                raise _error(
                    json_path,
                    f"{twhere} records nbytes {nbytes} but shape {shape} x {dtype_name} is {want} bytes; "
                    f"the index is damaged, {_REBUILD}",
                )
            if offset + nbytes > shard_size:
                raise _error(
                    json_path,
                    f"{twhere} spans bytes {offset}..{offset + nbytes} but shard {data_path} has "
                    f"{shard_size}; the index is damaged, {_REBUILD}",
                )
            rec["_dtype"] = dtype
            extents.append((offset, offset + nbytes, name))

        # Overlapping tensors mean a hand-edited or damaged index; catch it rather than return
        # two weights sharing bytes.
        extents.sort()
        for (_, end_a, name_a), (start_b, _, name_b) in zip(extents, extents[1:]):
            if start_b < end_a:
                raise _error(json_path, f"tensors {name_a!r} and {name_b!r} overlap in {data_path}; {_REBUILD}")
        parsed.append((shard, tensors))
    return parsed


def _check_expected(
    json_path: Path,
    parsed: list[tuple[dict, list[dict]]],
    expected: list[tuple[str, tuple[int, ...], str]],
) -> None:
    """The package must hold exactly the parameters the model library was compiled for."""
    have = {rec["name"]: rec for _, tensors in parsed for rec in tensors}
    fix = "the package does not match the model library, rebuild both together with python -m atom_tvm.build"
    want_names = set()
    missing = []
    for name, shape, dtype in expected:
        want_names.add(name)
        rec = have.get(name)
        if rec is None:
            missing.append((name, tuple(shape), dtype))
            continue
        if rec["dtype"] != dtype:
            raise _error(
                json_path, f"{name} has dtype {rec['dtype']} but the model library expects {dtype}; {fix}"
            )
        if tuple(rec["shape"]) != tuple(int(d) for d in shape):
            raise _error(
                json_path,
                f"{name} has shape {tuple(rec['shape'])} but the model library expects {tuple(shape)}; {fix}",
            )
    if missing:
        name, shape, dtype = missing[0]
        more = f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else ""
        raise _error(json_path, f"has no tensor {name} ({dtype} {shape}) that the model library expects{more}; {fix}")
    unknown = [n for n in have if n not in want_names]
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise _error(json_path, f"tensor {unknown[0]} is not a parameter of the model library{more}; {fix}")


def check_tensor_parallel_files(pkg_dir: Path | str, shards: int) -> None:
    """Every shard's tensor cache and data files are in place (before any GPU worker starts, so a
    missing file is reported by its shard instead of failing one worker)."""
    for shard in range(shards):
        shard_dir = Path(pkg_dir) / tensor_parallel_dir(shard)
        try:
            for data_file, _ in _parse_index(shard_dir / TENSOR_CACHE):
                path = shard_dir / data_file["dataPath"]
                if not path.is_file():
                    raise _error(path, f"missing; the package is incomplete, {_REBUILD}")
        except UserError as err:
            raise UserError(f"tensor-parallel shard {shard} of {shards}: {err}") from None


def load_tensor_cache(
    pkg_dir: Path | str,
    expected: list[tuple[str, tuple[int, ...], str]] | None = None,
    verify: bool = True,
) -> dict[str, np.ndarray]:
    """Read every tensor of the package in ``pkg_dir``, keyed by name, in index order.

    Checks, each failing with a one-line UserError naming the file:

    * tensor-cache.json exists, parses and is structurally sound; each record's nbytes equals
      prod(shape) * itemsize and lies inside its shard; names are unique;
    * with ``expected`` (name, shape, dtype) -- from the model library's metadata -- every expected
      name is present with exactly that shape and dtype, and there are no other names;
    * each shard exists and has exactly the recorded size;
    * with ``verify`` (default), each shard's md5 matches the index. ``verify=False`` skips only
      this hash, for fast loads of a package already verified once.

    Each shard is read with one read call; the returned arrays are fresh, writable, aligned copies
    owning their memory (they neither alias the shard buffer nor keep it alive).
    """
    pkg_dir = Path(pkg_dir)
    json_path = pkg_dir / TENSOR_CACHE
    parsed = _parse_index(json_path)
    if expected is not None:
        _check_expected(json_path, parsed, expected)

    out: dict[str, np.ndarray] = {}
    for shard, tensors in parsed:
        shard_path = pkg_dir / shard["dataPath"]
        recorded = shard["nbytes"]
        try:
            with open(shard_path, "rb") as f:
                # Read one byte past the recorded size so a longer file is noticed too.
                data = f.read(recorded + 1)
        except FileNotFoundError:
            raise _error(shard_path, f"missing; the package is incomplete, {_REBUILD}") from None
        except IsADirectoryError:
            raise _error(shard_path, f"is a directory, not a shard file; {_REBUILD}") from None
        except OSError as exc:
            raise _error(shard_path, f"cannot be read ({exc.strerror or exc}); check its permissions") from None
        if len(data) != recorded:
            size = f"{len(data)} bytes" if len(data) <= recorded else "longer"
            raise _error(
                shard_path,
                f"is {size} but {TENSOR_CACHE} records {recorded} (truncated or overwritten?); "
                f"the package is corrupt, {_REBUILD}",
            )
        if verify:
            want_md5 = _get(shard, "md5sum", str, f"shard {shard['dataPath']}", json_path)
            md5 = _md5()
            md5.update(data)
            got = md5.hexdigest()
            if got != want_md5.lower():
                raise _error(
                    shard_path,
                    f"md5 mismatch (expected {want_md5}, got {got}); the package is corrupt, {_REBUILD}",
                )
        view = memoryview(data)
        for rec in tensors:
            dtype, offset, nbytes = rec["_dtype"], rec["byteOffset"], rec["nbytes"]
            flat = np.frombuffer(view[offset : offset + nbytes], dtype=dtype.newbyteorder("<"))
            # astype to the native dtype copies (owning, aligned, writable) and byte-swaps on a
            # big-endian host; on little-endian hosts it is a plain copy.
            out[rec["name"]] = flat.astype(dtype, copy=True).reshape(rec["shape"])
        del view, data
    return out


# ---------------------------------------------------------------------------------------------
# mlc-chat-config.json
# ---------------------------------------------------------------------------------------------


def read_chat_config(pkg_dir: Path | str) -> dict:
    """Load ``mlc-chat-config.json`` from ``pkg_dir`` and check every REQUIRED_CHAT_KEYS is present."""
    path = Path(pkg_dir) / CHAT_CONFIG
    config = _read_json_file(path, "chat config")
    if not isinstance(config, dict):
        raise _error(path, f"top level is {type(config).__name__}, not an object; {_REBUILD}")
    missing = [key for key in REQUIRED_CHAT_KEYS if key not in config]
    if missing:
        keys = ", ".join(repr(k) for k in missing)
        noun, it = ("key", "it") if len(missing) == 1 else ("keys", "them")
        raise _error(path, f"missing required {noun} {keys}; add {it} or {_REBUILD}")
    return config
