"""Quantized paged KV cache kernels (CPU builds; the cuda variants on a GPU) against the float64 "append then attend" reference.

Every case appends a prefix, then the new tokens, into shuffled (non-contiguous) pages of one
layer of a multi-layer cache whose unused slots (and other layers) hold garbage, and checks:
* the rotated q bit for bit against TVM's own Llama RoPE kernel (`llama_rope_with_position_map`,
  built for the same CPU), and the page contents bit for bit against `write_pages_ref`
  (formats.quantize_kv_asym) of that kernel's float16 rotated K and of V, every other layer
  untouched. `rope_ref` (correctly
  rounded float32 RoPE) is checked against TVM's kernel within one float16 ulp: libm's sin, cos
  and pow are not correctly rounded, so a few values in a million differ in the last bit;
* the attention output against `attention_ref` (float64 on the same dequantized K/V) within
  ``ulp16(ref) / 2 + 2**-16 * max|V|``: half a float16 ulp is the output's own rounding, and the
  absolute term bounds the float32 accumulation error of scores, softmax and P.V over up to
  4000 tokens (measured at most 3.5e-6 * max|V| beyond the half ulp on these cases, so the
  bound has a 4x margin), which only matters where the output lies next to a rounding boundary.
"""

from __future__ import annotations

import functools
import shutil

import numpy as np
import pytest
import tvm

from atom_tvm import cuda_build
from atom_tvm.errors import UserError
from tir_kernels import kv_attention as kva
from tir_kernels.quantize import build

P = kva.PAGE_SIZE
THETA = 10000.0
HEADS = [(9, 3, 64), (32, 8, 128), (32, 32, 128)]
NUM_LAYERS = 2
#: The layer each KV width works on (the last one for two widths: its offset is not 0).
LAYER = {4: 1, 8: 0, 16: 1}
#: Llama 3.1's RoPE scaling (its theta is 500000).
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
SCALINGS = {None: None, "llama3": LLAMA3}


@functools.lru_cache(maxsize=None)
def _tvm_rope(hq: int, hkv: int, dim: int, theta: float = THETA, scaling: str | None = None):
    from tvm.relax.frontend.nn.llm.position_embedding import llama_rope_with_position_map

    func = llama_rope_with_position_map(theta, 1.0, dim, hq, hkv, "float16", SCALINGS[scaling] or {})
    run = tvm.compile(func, tvm.target.Target({"kind": "llvm"}))[func.attrs["global_symbol"]]

    def rope(qkv, positions):
        dev = tvm.cpu()
        outs = [tvm.runtime.tensor(np.zeros((len(qkv), h, dim), np.float16), dev) for h in (hq, hkv, hkv)]
        run(tvm.runtime.tensor(qkv, dev), tvm.runtime.tensor(positions, dev), *outs, 1)
        return [o.numpy() for o in outs]

    return rope


def _assert_rope_close(x, positions, want, theta=THETA, scaling=None):
    """rope_ref(x) within one float16 ulp of ``want`` plus a float32 slack: where cos x + sin rot
    cancels, a last-bit difference of libm's cos/sin is large relative to the result."""
    got = kva.rope_ref(x, positions, theta, SCALINGS[scaling]).astype(np.float64)
    x = x.astype(np.float64)
    half = x.shape[-1] // 2
    terms = np.abs(x) + np.abs(np.concatenate([x[..., half:], x[..., :half]], axis=-1))
    ulp = np.maximum(np.spacing(np.abs(got)), np.spacing(np.abs(want))).astype(np.float64)
    err = np.abs(got - want) / (ulp + 2.0**-20 * terms)
    assert err.max() <= 1, f"rope_ref differs from TVM's RoPE by {err.max()} of the tolerance"


def _gpu_arch() -> str:
    major, minor = tvm.cuda(0).compute_version.split(".")
    arch = f"sm_{major}{minor}"
    return "sm_90a" if arch == "sm_90" else arch


@functools.lru_cache(maxsize=None)
def _kernel(kind: str, kv_bits: int, hq: int, hkv: int, dim: int, variant: str = "cpu",
            theta: float = THETA, scaling: str | None = None):
    extra = {"rope_theta": theta, "rope_scaling": SCALINGS[scaling]} if kind == "append" else {}
    func = getattr(kva, kind)(kv_bits, hq, hkv, dim, variant=variant, **extra)
    archs = (_gpu_arch(),) if variant == "cuda" else ()
    return build(func, variant, archs)[func.attrs["global_symbol"]]


def _page_table(rng, lengths):
    """Shuffled pages for sequences of the given final lengths, plus a few never used."""
    counts = [-(-n // P) for n in lengths]
    num_pages = sum(counts) + 3
    indices = rng.permutation(num_pages)[: sum(counts)].astype(np.int32)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    last = np.array([n - (c - 1) * P for n, c in zip(lengths, counts)], np.int32)
    return num_pages, indptr, indices, last


def _tokens(indptr, indices, start, stop):
    """positions and slots of tokens start[b] .. stop[b]-1 of every sequence, batch order."""
    pos, slots = [], []
    for b in range(len(start)):
        p = np.arange(start[b], stop[b])
        pos.append(p)
        slots.append(indices[indptr[b] + p // P] * P + p % P)
    return np.concatenate(pos).astype(np.int32), np.concatenate(slots).astype(np.int32)


def _garbage_pages(rng, num_pages, hkv, dim, kv_bits):
    pages = []
    for shape, dtype in kva.page_shapes(NUM_LAYERS, num_pages, hkv, dim, kv_bits):
        if dtype == "uint8":
            pages.append(rng.integers(0, 256, shape, dtype=np.uint8))
        else:
            pages.append(rng.uniform(-1000, 1000, shape).astype(np.float16))
    return tuple(pages)


def _append_and_check(rng, kv_bits, heads, pos, slots, pages, ref_pages, layer, variant,
                      theta=THETA, scaling=None):
    """Appends random qkv rows at ``pos``/``slots`` of ``layer`` into the device ``pages``,
    checks q_rot and all pages bit for bit; returns (q_rot, the new reference pages)."""
    hq, hkv, dim = heads
    dev = pages[0].device
    # K and V spread over a few orders of magnitude across tokens, as real activations.
    qkv = (rng.standard_normal((len(pos), hq + 2 * hkv, dim))
           * rng.uniform(0.1, 4, (len(pos), 1, 1))).astype(np.float16)
    q_tvm, k_tvm, v = _tvm_rope(hq, hkv, dim, theta, scaling)(qkv, pos)
    _assert_rope_close(qkv[:, :hq], pos, q_tvm, theta, scaling)
    _assert_rope_close(qkv[:, hq:hq + hkv], pos, k_tvm, theta, scaling)
    if variant == "cuda":
        # The cuda append rotates with correctly rounded pow/cos/sin (see its docstring).
        q_tvm = kva.rope_ref(qkv[:, :hq], pos, theta, SCALINGS[scaling])
        k_tvm = kva.rope_ref(qkv[:, hq:hq + hkv], pos, theta, SCALINGS[scaling])
    ref_pages = kva.write_pages_ref(ref_pages, layer, slots, k_tvm, v, kv_bits)
    q_rot = tvm.runtime.tensor(np.zeros((len(pos), hq, dim), np.float16), dev)
    append = _kernel("append", kv_bits, hq, hkv, dim, variant, theta, scaling)
    append(*[tvm.runtime.tensor(a, dev) for a in (qkv, pos, slots)], *pages, layer, q_rot)
    np.testing.assert_array_equal(q_rot.numpy().view(np.uint16), q_tvm.view(np.uint16))
    for got, want in zip(pages, ref_pages):
        np.testing.assert_array_equal(got.numpy().view(np.uint8), want.view(np.uint8))
    return q_rot, ref_pages


def _run(kv_bits, heads, prefix, new, seed, decode=False, variant="cpu"):
    hq, hkv, dim = heads
    layer = LAYER[kv_bits]
    rng = np.random.default_rng(seed)
    lengths = [a + b for a, b in zip(prefix, new)]
    num_pages, indptr, indices, last = _page_table(rng, lengths)
    ref_pages = _garbage_pages(rng, num_pages, hkv, dim, kv_bits)
    dev = tvm.cuda(0) if variant == "cuda" else tvm.cpu()
    pages = [tvm.runtime.tensor(p, dev) for p in ref_pages]
    q_rot = None
    written = []
    for start, stop in ((np.zeros_like(prefix), prefix), (prefix, lengths)):
        pos, slots = _tokens(indptr, indices, start, stop)
        if not len(pos):
            continue
        written.append(slots)
        q_rot, ref_pages = _append_and_check(rng, kv_bits, heads, pos, slots, pages, ref_pages,
                                             layer, variant)
    q = q_rot.numpy()
    qo_indptr = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
    ref = kva.attention_ref(q, qo_indptr, ref_pages, layer, indptr, indices, last, kv_bits)
    table = [tvm.runtime.tensor(a, dev) for a in (indptr, indices, last)]
    out = tvm.runtime.tensor(np.zeros_like(q), dev)
    if decode:
        _kernel("decode", kv_bits, hq, hkv, dim, variant)(q_rot, *pages, layer, *table, out)
    else:
        _kernel("prefill", kv_bits, hq, hkv, dim, variant)(
            q_rot, tvm.runtime.tensor(qo_indptr, dev), *pages, layer, *table, out)
    got = out.numpy().astype(np.float64)
    slots = np.concatenate(written)
    layer_pages = tuple(p[layer] for p in ref_pages)
    v_max = np.abs(kva.dequantize_pages_ref(layer_pages, kv_bits)[slots // P, 1, :, slots % P]).max()
    tol = 0.5 * np.spacing(np.abs(ref).astype(np.float16)).astype(np.float64) + 2.0**-16 * v_max
    err = np.abs(got - ref)
    assert np.isfinite(got).all()
    assert (err <= tol).all(), f"max error {err.max():.3g}, worst error/tolerance {(err / tol).max():.3g}"


@pytest.mark.parametrize("variant", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("kv_bits", kva.KV_BITS)
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}q{h[1]}kv_d{h[2]}")
def test_append_and_decode(kv_bits, heads, variant):
    lengths = [1, P - 1, P, P + 1, 2 * P, 2 * P + 1, 300, 1000]
    if heads == HEADS[0]:
        lengths.append(4000)
    prefix = np.array(lengths) - 1
    _run(kv_bits, heads, prefix, np.ones_like(prefix), seed=kv_bits * 7 + heads[0], decode=True,
         variant=variant)


@pytest.mark.parametrize("variant", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("kv_bits", kva.KV_BITS)
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}q{h[1]}kv_d{h[2]}")
def test_prefill(kv_bits, heads, variant):
    # (cached prefix, new tokens): fresh prompts ending before, on and after a page boundary,
    # continuations starting mid-page and on a boundary, a sequence with no new token, and a
    # long cached prefix with a chunk of new tokens.
    cases = [(0, 1), (0, P - 1), (0, P), (0, P + 1), (P - 1, 1), (P, P), (17, 40), (20, 0),
             (5, 120), (700, 33)]
    if heads == HEADS[0]:
        cases.append((3990, 10))
    if variant == "cuda":
        # Fresh prompts of many query tiles; 4000 tokens where the float64 reference stays small.
        cases += [(0, 4000 if heads == HEADS[0] else 1500), (1000, 517)]
    prefix, new = (np.array(c) for c in zip(*cases))
    _run(kv_bits, heads, prefix, new, seed=kv_bits * 11 + heads[0], variant=variant)


@pytest.mark.parametrize("variant", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("kv_bits", [4, 16])
@pytest.mark.parametrize("heads", HEADS[:2], ids=lambda h: f"{h[0]}q{h[1]}kv_d{h[2]}")
def test_append_llama3_rope(kv_bits, heads, variant):
    """Llama 3.1's scaled RoPE: q and the pages bit for bit as with the default RoPE, at
    positions across the scaled, smoothed and unscaled frequency bands' periods."""
    rng = np.random.default_rng(kv_bits + heads[0])
    num_pages = 40
    dev = tvm.cuda(0) if variant == "cuda" else tvm.cpu()
    ref_pages = _garbage_pages(rng, num_pages, heads[1], heads[2], kv_bits)
    pages = [tvm.runtime.tensor(p, dev) for p in ref_pages]
    slots = rng.permutation(num_pages * P)[:300].astype(np.int32)
    pos = np.concatenate([np.arange(100), rng.integers(100, 130000, 200)]).astype(np.int32)
    _append_and_check(rng, kv_bits, heads, pos, slots, pages, ref_pages, 1, variant,
                      theta=500000.0, scaling="llama3")


def test_cuda_append_warps_follow_the_token_count():
    """One cuda append kernel per `_APPEND_TIERS` entry, chosen at run time by the token count n:
    32 warps up to 256 tokens (no more than a token has rows), 8 up to 1024, 4 above. The GPU
    tests' appends (1 to about 5600 tokens a call) run all three."""
    def tiers(func):
        lines = [line.strip() for line in func.script().splitlines()]
        return ([line for line in lines if line.startswith("if n <=")],
                [line.split(", ")[1].rstrip(")") for line in lines if 'launch_thread("threadIdx.x"' in line])

    assert tiers(kva.append(4, 40, 40, 128, THETA, variant="cuda")) == (
        ["if n <= 256:", "if n <= 1024:"], ["1024", "256", "128"])
    assert tiers(kva.append(4, 9, 3, 64, THETA, variant="cuda"))[1] == ["480", "256", "128"]  # 15 rows


def test_rejects_unknown_rope_scaling():
    with pytest.raises(UserError, match="yarn"):
        kva.append(4, 32, 8, 128, 1e4, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(UserError, match="low_freq_factor"):
        kva.append(4, 32, 8, 128, 1e4, rope_scaling={"rope_type": "llama3", "factor": 8.0})


def test_cuda_kernels_compile_for_sm80_and_sm90a(tmp_path):
    """The cuda append (llama3 RoPE too) and decode of every test shape, prefill and copy_pages
    of one, in one module, SASS for both archs."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed (CUDA toolkit needed to build --target cuda)")
    funcs = [getattr(kva, kind)(bits, *heads, *((THETA,) if kind == "append" else ()), variant="cuda")
             for kind in ("append", "decode") for bits in kva.KV_BITS for heads in HEADS]
    # One head shape of prefill and copy_pages: their code does not depend on the shape.
    funcs += [kva.prefill(bits, *HEADS[1], variant="cuda") for bits in kva.KV_BITS]
    funcs += [kva.copy_pages(bits, *HEADS[1][1:], variant="cuda") for bits in kva.KV_BITS]
    funcs.append(kva.append(4, 32, 8, 128, 500000.0, variant="cuda", rope_scaling=LLAMA3)
                 .with_attr("global_symbol", "kv_append_llama3_cuda"))
    exe = build(tvm.IRModule({f.attrs["global_symbol"]: f for f in funcs}), "cuda", ("sm_80", "sm_90a"))
    lib = tmp_path / "kv_attention.so"
    exe.export_library(str(lib))
    data = lib.read_bytes()
    for f in funcs:
        assert f"{f.attrs['global_symbol']}_kernel".encode() in data
    if cuda_build.find_cuobjdump() is not None:
        codes = cuda_build.list_cuda_codes(lib)
        assert codes["sass"] == ["sm_80", "sm_90a"] and codes["ptx"] == ["sm_80"]


@pytest.mark.parametrize("variant", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("kv_bits", kva.KV_BITS)
def test_copy_pages(kv_bits, variant):
    """Copy-on-write: every layer's src pages land on the dst pages, nothing else changes."""
    rng = np.random.default_rng(kv_bits)
    hkv, dim, num_pages = 3, 64, 12
    pages = _garbage_pages(rng, num_pages, hkv, dim, kv_bits)
    order = rng.permutation(num_pages).astype(np.int32)
    src, dst = order[:4], order[4:8]
    func = kva.copy_pages(kv_bits, hkv, dim, variant=variant)
    archs = (_gpu_arch(),) if variant == "cuda" else ()
    run = build(func, variant, archs)[func.attrs["global_symbol"]]
    dev = tvm.cuda(0) if variant == "cuda" else tvm.cpu()
    got = [tvm.runtime.tensor(p, dev) for p in pages]
    run(*got, tvm.runtime.tensor(src, dev), tvm.runtime.tensor(dst, dev))
    for g, want in zip(got, kva.copy_pages_ref(pages, src, dst)):
        np.testing.assert_array_equal(g.numpy().view(np.uint8), want.view(np.uint8))


def test_page_shapes():
    assert kva.page_shapes(2, 10, 8, 128, 4) == [((2, 10, 2, 8, P, 64), "uint8"),
                                                 ((2, 10, 2, 8, P, 2), "float16")]
    assert kva.page_shapes(1, 10, 8, 128, 8) == [((1, 10, 2, 8, P, 128), "uint8"),
                                                 ((1, 10, 2, 8, P, 2), "float16")]
    assert kva.page_shapes(32, 10, 8, 64, 16) == [((32, 10, 2, 8, P, 64), "float16")]
    with pytest.raises(UserError):
        kva.page_shapes(0, 10, 8, 64, 16)


@pytest.mark.parametrize("args", [(3, 32, 8, 128), (4, 32, 8, 96), (4, 30, 8, 128)])
def test_rejects_unsupported(args):
    with pytest.raises(UserError):
        kva.decode(*args)
