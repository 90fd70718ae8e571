"""Tests for atom_tvm.package: tensor cache round trip, shard layout, corruption detection, chat config.

Expectations are computed here independently (raw bytes, hashlib, hand-derived offsets) rather
than by calling back into the module under test.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from atom_tvm.errors import UserError
from atom_tvm.package import (
    CHAT_CONFIG,
    REQUIRED_CHAT_KEYS,
    TENSOR_CACHE,
    load_tensor_cache,
    read_chat_config,
    shard_name,
    write_json_atomic,
    write_tensor_cache,
)

REPO = Path(__file__).resolve().parents[1]


def make_params(seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """Fresh random tensors covering every dtype, a 0-d array and an empty array."""
    rng = np.random.default_rng(seed)
    return [
        ("model.embed.weight", rng.standard_normal((3, 5)).astype(np.float32)),
        ("model.layers.0.attn.weight", rng.standard_normal((7,)).astype(np.float16)),
        ("model.layers.0.q.weight", rng.integers(-128, 128, size=(2, 3, 4), dtype=np.int8)),
        ("model.layers.0.empty", np.zeros((0, 4), dtype=np.uint8)),
        ("model.layers.0.scalar", np.array(rng.integers(-(2**31), 2**31), dtype=np.int32)),
        ("model.layers.0.packed", rng.integers(0, 2**32, size=(4, 4), dtype=np.uint32)),
        ("model.norm.weight", rng.integers(0, 256, size=(9,), dtype=np.uint8)),
        # Non-contiguous input must be stored in C order of its logical shape.
        ("lm_head.weight", rng.standard_normal((4, 6)).astype(np.float32).T),
    ]


def expected_of(params):
    return [(name, tuple(arr.shape), arr.dtype.name) for name, arr in params]


def assert_user_error(call, path: Path, *fragments: str) -> str:
    """``call`` raises UserError whose single-line message starts with ``path`` and has ``fragments``."""
    with pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, message
    assert message.startswith(f"{path}:"), message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.fixture
def multi_shard_pkg(tmp_path):
    """A package whose tensors are spread over several shards (shard_bytes=64)."""
    params = make_params(1)
    pkg = tmp_path / "pkg"
    index = write_tensor_cache(pkg, params, shard_bytes=64)
    assert len(index["records"]) >= 3
    return pkg, params, index


def shard_holding(index, name):
    for shard in index["records"]:
        for rec in shard["records"]:
            if rec["name"] == name:
                return shard, rec
    raise AssertionError(name)


# --------------------------------------------------------------------------- round trip & layout


@pytest.mark.parametrize("shard_bytes", [1, 64, 32 << 20])
def test_round_trip_exact(tmp_path, shard_bytes):
    params = make_params(2)
    write_tensor_cache(tmp_path, params, shard_bytes=shard_bytes)
    loaded = load_tensor_cache(tmp_path, expected=expected_of(params))
    assert list(loaded) == [name for name, _ in params]
    for name, arr in params:
        got = loaded[name]
        assert got.dtype == arr.dtype and got.shape == arr.shape, name
        assert got.tobytes() == arr.tobytes(), name
        assert got.flags.writeable and got.flags.c_contiguous, name
    arrays = list(loaded.values())
    for i, a in enumerate(arrays):
        for b in arrays[i + 1 :]:
            assert not np.shares_memory(a, b)


def test_round_trip_bfloat16(tmp_path):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    arr = np.random.default_rng(3).standard_normal((3, 2)).astype(ml_dtypes.bfloat16)
    index = write_tensor_cache(tmp_path, [("w", arr)])
    assert index["records"][0]["records"][0]["dtype"] == "bfloat16"
    loaded = load_tensor_cache(tmp_path, expected=[("w", (3, 2), "bfloat16")])
    assert loaded["w"].dtype == arr.dtype and loaded["w"].tobytes() == arr.tobytes()


def test_on_disk_layout_matches_mlc_format(tmp_path):
    params = make_params(4)
    returned = write_tensor_cache(tmp_path, params, shard_bytes=100)
    on_disk = json.loads((tmp_path / TENSOR_CACHE).read_text())
    assert returned == on_disk

    total = sum(arr.nbytes for _, arr in params)
    elems = sum(arr.size for _, arr in params)
    assert on_disk["metadata"]["ParamSize"] == len(params)
    assert on_disk["metadata"]["ParamBytes"] == total
    assert on_disk["metadata"]["BitsPerParam"] == pytest.approx(total * 8 / elems)

    by_name = dict(params)
    seen = []
    for i, shard in enumerate(on_disk["records"]):
        assert shard["dataPath"] == f"params_shard_{i}.bin"
        assert shard["format"] == "raw-shard"
        blob = (tmp_path / shard["dataPath"]).read_bytes()
        assert shard["nbytes"] == len(blob)
        assert shard["md5sum"] == hashlib.md5(blob).hexdigest()
        for rec in shard["records"]:
            arr = by_name[rec["name"]]
            assert rec["format"] == "raw"
            assert rec["dtype"] == arr.dtype.name
            assert rec["shape"] == list(arr.shape)
            assert rec["nbytes"] == arr.nbytes
            assert rec["byteOffset"] % 64 == 0
            assert blob[rec["byteOffset"] : rec["byteOffset"] + rec["nbytes"]] == arr.tobytes()
            seen.append(rec["name"])
    assert seen == [name for name, _ in params]  # packed in the order given
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_shards_split_as_expected(tmp_path):
    f32 = lambda n: np.arange(n, dtype=np.float32)  # noqa: E731 - n float32 = 4n bytes
    params = [
        ("a", f32(25)),  # 100 B at 0
        ("b", f32(25)),  # aligned to 128, ends at 228 <= 256: same shard
        ("c", f32(25)),  # would start at 256 and end at 356 > 256: new shard
        ("big", f32(75)),  # 300 B > shard_bytes: after c it overflows, so its own shard
        ("e", f32(1)),  # the big shard is already past 256: new shard
        ("f", f32(32)),  # 128 B at aligned 64, ends at 192: joins e
        ("g", f32(16)),  # 64 B at 192, ends exactly at 256: still fits
        ("h", f32(1)),  # no room left: new shard
    ]
    index = write_tensor_cache(tmp_path, params, shard_bytes=256)
    layout = [[(r["name"], r["byteOffset"]) for r in s["records"]] for s in index["records"]]
    assert layout == [
        [("a", 0), ("b", 128)],
        [("c", 0)],
        [("big", 0)],
        [("e", 0), ("f", 64), ("g", 192)],
        [("h", 0)],
    ]
    sizes = [(tmp_path / shard_name(i)).stat().st_size for i in range(5)]
    assert sizes == [228, 100, 300, 256, 4]
    assert not (tmp_path / shard_name(5)).exists()
    loaded = load_tensor_cache(tmp_path)
    for name, arr in params:
        assert np.array_equal(loaded[name], arr)


def test_empty_param_list(tmp_path):
    index = write_tensor_cache(tmp_path, [])
    assert index["records"] == [] and index["metadata"]["ParamSize"] == 0
    assert load_tensor_cache(tmp_path, expected=[]) == {}


def test_rewrite_removes_stale_shards(tmp_path):
    write_tensor_cache(tmp_path, make_params(5), shard_bytes=1)
    assert (tmp_path / shard_name(6)).exists()
    params = make_params(6)
    write_tensor_cache(tmp_path, params)
    shards = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("params_shard_"))
    assert shards == [shard_name(0)]
    loaded = load_tensor_cache(tmp_path)
    assert all(loaded[n].tobytes() == a.tobytes() for n, a in params)


def test_failed_write_leaves_old_package_intact(tmp_path):
    old = make_params(7)
    write_tensor_cache(tmp_path, old, shard_bytes=64)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def failing():
        yield from make_params(8)[:3]
        raise RuntimeError("converter blew up")

    with pytest.raises(RuntimeError, match="blew up"):
        write_tensor_cache(tmp_path, failing(), shard_bytes=64)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    loaded = load_tensor_cache(tmp_path)
    assert all(loaded[n].tobytes() == a.tobytes() for n, a in old)


def test_write_rejects_bad_input(tmp_path):
    with pytest.raises(UserError, match="complex64"):
        write_tensor_cache(tmp_path, [("w", np.zeros(2, np.complex64))])
    with pytest.raises(UserError, match="twice"):
        write_tensor_cache(tmp_path, [("w", np.zeros(2, np.int8)), ("w", np.zeros(2, np.int8))])
    assert not list(tmp_path.iterdir())


def test_big_endian_input_is_stored_little_endian(tmp_path):
    arr = np.arange(6, dtype=">u4").reshape(2, 3)
    write_tensor_cache(tmp_path, [("w", arr)])
    assert (tmp_path / shard_name(0)).read_bytes() == arr.astype("<u4").tobytes()
    assert np.array_equal(load_tensor_cache(tmp_path)["w"], arr)


# --------------------------------------------------------------------------- corruption detection


def test_flipped_byte_is_md5_mismatch(multi_shard_pkg):
    pkg, params, index = multi_shard_pkg
    victim = next(r for r in index["records"][1]["records"] if r["nbytes"])
    shard_path = pkg / shard_name(1)
    blob = bytearray(shard_path.read_bytes())
    blob[victim["byteOffset"]] ^= 0xFF
    shard_path.write_bytes(bytes(blob))
    msg = assert_user_error(lambda: load_tensor_cache(pkg), shard_path, "md5 mismatch", "atom_tvm.build")
    assert index["records"][1]["md5sum"] in msg
    # verify=False skips the hash (and only the hash): the flipped byte now reaches the caller.
    loaded = load_tensor_cache(pkg, verify=False)
    differs = [n for n, a in params if loaded[n].tobytes() != a.tobytes()]
    assert differs == [victim["name"]]


def test_missing_shard(multi_shard_pkg):
    pkg, _, _ = multi_shard_pkg
    (pkg / shard_name(2)).unlink()
    for verify in (True, False):
        assert_user_error(lambda: load_tensor_cache(pkg, verify=verify), pkg / shard_name(2), "missing")


def test_shard_shorter_than_recorded(multi_shard_pkg):
    pkg, _, index = multi_shard_pkg
    shard_path = pkg / shard_name(1)
    blob = shard_path.read_bytes()
    shard_path.write_bytes(blob[:-1])
    for verify in (True, False):
        assert_user_error(
            lambda: load_tensor_cache(pkg, verify=verify), shard_path, str(len(blob) - 1), str(len(blob))
        )


def test_shard_longer_than_recorded(multi_shard_pkg):
    pkg, _, _ = multi_shard_pkg
    shard_path = pkg / shard_name(0)
    shard_path.write_bytes(shard_path.read_bytes() + b"\0")
    assert_user_error(lambda: load_tensor_cache(pkg, verify=False), shard_path, "longer")


def test_expected_matches(multi_shard_pkg):
    pkg, params, _ = multi_shard_pkg
    # Order of `expected` need not follow the package's order.
    loaded = load_tensor_cache(pkg, expected=list(reversed(expected_of(params))))
    assert set(loaded) == {n for n, _ in params}


def test_expected_wrong_dtype(multi_shard_pkg):
    pkg, params, _ = multi_shard_pkg
    expected = expected_of(params)
    name, shape, _ = expected[1]  # stored as float16
    expected[1] = (name, shape, "float32")
    assert_user_error(
        lambda: load_tensor_cache(pkg, expected=expected),
        pkg / TENSOR_CACHE,
        f"{name} has dtype float16 but the model library expects float32",
    )


def test_expected_wrong_shape(multi_shard_pkg):
    pkg, params, _ = multi_shard_pkg
    expected = expected_of(params)
    name, _, dtype = expected[0]  # stored as (3, 5)
    expected[0] = (name, (5, 3), dtype)
    assert_user_error(
        lambda: load_tensor_cache(pkg, expected=expected), pkg / TENSOR_CACHE, name, "(3, 5)", "(5, 3)"
    )


def test_expected_name_missing_from_package(multi_shard_pkg):
    pkg, params, _ = multi_shard_pkg
    expected = expected_of(params) + [("model.layers.1.missing.weight", (4, 4), "float32")]
    assert_user_error(
        lambda: load_tensor_cache(pkg, expected=expected),
        pkg / TENSOR_CACHE,
        "has no tensor model.layers.1.missing.weight",
    )


def test_unknown_extra_name_in_package(multi_shard_pkg):
    pkg, params, _ = multi_shard_pkg
    expected = expected_of(params)
    extra = expected.pop(3)[0]
    assert_user_error(
        lambda: load_tensor_cache(pkg, expected=expected), pkg / TENSOR_CACHE, extra, "not a parameter"
    )


def test_truncated_index(multi_shard_pkg):
    pkg, _, _ = multi_shard_pkg
    path = pkg / TENSOR_CACHE
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    assert_user_error(lambda: load_tensor_cache(pkg), path, "not valid JSON (truncated?)")


def test_missing_index(tmp_path):
    assert_user_error(lambda: load_tensor_cache(tmp_path), tmp_path / TENSOR_CACHE, "missing")


def edit_index(pkg: Path, edit) -> None:
    path = pkg / TENSOR_CACHE
    index = json.loads(path.read_text())
    edit(index)
    path.write_text(json.dumps(index))


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda ix: ix["records"][0]["records"][0].__setitem__("nbytes", 7), "nbytes 7"),
        (lambda ix: ix["records"][0]["records"][0].__setitem__("byteOffset", 10**6), "spans bytes"),
        (lambda ix: ix["records"][0]["records"][0].pop("dtype"), "'dtype'"),
        (lambda ix: ix["records"][0]["records"][0].__setitem__("dtype", "float8"), "float8"),
        (lambda ix: ix["records"][0].__setitem__("dataPath", "../../etc/passwd"), "not a file name"),
        (lambda ix: ix.pop("records"), "'records'"),
        (lambda ix: ix["records"][1]["records"].append(dict(ix["records"][0]["records"][0])), "twice"),
    ],
)
def test_damaged_index_fields(multi_shard_pkg, edit, fragment):
    pkg, _, _ = multi_shard_pkg
    edit_index(pkg, edit)
    assert_user_error(lambda: load_tensor_cache(pkg), pkg / TENSOR_CACHE, fragment)


def test_name_with_newline_still_gives_one_line(tmp_path):
    write_tensor_cache(tmp_path, [("evil\nname", np.zeros(2, np.int8))])
    assert_user_error(
        lambda: load_tensor_cache(tmp_path, expected=[("evil\nname", (2,), "int32")]),
        tmp_path / TENSOR_CACHE,
        "expects int32",
    )


# --------------------------------------------------------------------------- chat config


def valid_chat_config() -> dict:
    return {
        "model_type": "llama",
        "quantization": "q4f16_1",
        "model_config": {"hidden_size": 64, "num_hidden_layers": 2},
        "context_window_size": 2048,
        "prefill_chunk_size": 512,
        "conv_template": {"name": "llama-3"},
        "tokenizer_files": ["tokenizer.json"],
        "bos_token_id": 1,
        "eos_token_id": [2],
        "pad_token_id": 0,
        "temperature": 0.6,
        "top_p": 0.9,
    }


def test_chat_config_round_trip(tmp_path):
    config = valid_chat_config()
    write_json_atomic(tmp_path / CHAT_CONFIG, {"stale": True})
    write_json_atomic(tmp_path / CHAT_CONFIG, config)  # overwrites
    assert read_chat_config(tmp_path) == config
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHAT_CONFIG]  # no temp files left
    assert set(REQUIRED_CHAT_KEYS) == set(config)


def test_chat_config_missing(tmp_path):
    assert_user_error(lambda: read_chat_config(tmp_path), tmp_path / CHAT_CONFIG, "missing")


def test_chat_config_bad_json(tmp_path):
    text = json.dumps(valid_chat_config(), indent=2)
    (tmp_path / CHAT_CONFIG).write_text(text[:-20])
    assert_user_error(lambda: read_chat_config(tmp_path), tmp_path / CHAT_CONFIG, "not valid JSON")


@pytest.mark.parametrize("key", ["top_p", "model_config", "pad_token_id"])
def test_chat_config_missing_key(tmp_path, key):
    config = valid_chat_config()
    del config[key]
    (tmp_path / CHAT_CONFIG).write_text(json.dumps(config))
    assert_user_error(lambda: read_chat_config(tmp_path), tmp_path / CHAT_CONFIG, repr(key))


def test_chat_config_not_an_object(tmp_path):
    (tmp_path / CHAT_CONFIG).write_text("[1, 2]")
    assert_user_error(lambda: read_chat_config(tmp_path), tmp_path / CHAT_CONFIG, "not an object")


def test_write_json_atomic_refuses_nan(tmp_path):
    with pytest.raises(ValueError):
        write_json_atomic(tmp_path / "x.json", {"temperature": float("nan")})
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- module hygiene


def test_module_does_not_import_tvm():
    code = "import sys, atom_tvm.package; assert not [m for m in sys.modules if m.split('.')[0] == 'tvm']"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env)
