"""Quantized paged KV cache: page layout, append (RoPE + quantize) and attention over the pages.

One kernel family in four kernels, each generated for ``kv_bits`` 4, 8 or 16 from one code path:

* `append` - RoPE on q and k of the fused qkv projection output, then K (rotated) and V quantized
  per token per head into their page slots; returns the rotated q for the attention kernels.
* `decode` - one query token per sequence attending to all of its pages (split-K over the pages).
* `prefill` - a ragged batch of new query tokens attending causally to their sequences' pages
  (the new tokens are appended first, so the pages hold the prefix and the new tokens alike).
* `copy_pages` - every layer's page ``src[i]`` copied to ``dst[i]`` (copy-on-write after a fork).

Page layout (THE layout; one set of buffers holds every layer)
--------------------------------------------------------------
A page holds ``P`` consecutive tokens (`PAGE_SIZE` = 16 by default) of one sequence for every
KV head, in every layer: page ``i`` of a sequence is page ``i`` of all ``L`` layers. Axis 0 is
the layer, axis 2 selects K (0) or V (1).

=========  ===============  =========================================  ========================
kv_bits    buffer           shape / dtype                              contents
=========  ===============  =========================================  ========================
4, 8       kv_codes         uint8 [L, pages, 2, H_kv, P, D*bits/8]     codes of `formats`' KV
                                                                       format; 4 bits: two per
                                                                       byte, low nibble = even d
4, 8       kv_scale_zero    float16 [L, pages, 2, H_kv, P, 2]          (scale, zero) of that row
16         kv_data          float16 [L, pages, 2, H_kv, P, D]          the values themselves
=========  ===============  =========================================  ========================

``L`` and ``pages`` are symbolic; `append`, `decode` and `prefill` take the layer they work on
as a scalar ``layer int32`` right after the page buffers. Outputs come last in every argument
list (Relax's ``call_tir_inplace`` passes the in-place page buffers among the inputs and
appends fresh outputs). Page addresses are computed in 64 bits: the buffers of all layers pass
2**31 elements long before they fill a GPU.

Each (token, head) row of K or V is quantized on its own, exactly as
`atom_tvm.quantization.formats.quantize_kv_asym` does (asymmetric, ``x ~ q * scale + zero``).
A sequence's pages are listed CSR-style: ``page_indptr int32 [B+1]``, ``page_indices int32
[page_indptr[B]]`` (any order, any pages), ``last_page_len int32 [B]`` (1..P tokens used in its
last page); its length is ``(pages - 1) * P + last_page_len`` and token ``j`` lives in page
``page_indices[page_indptr[b] + j // P]`` at offset ``j % P``. `append` addresses a token by its
slot ``page * P + offset``.

Numerics (what the ``*_ref`` functions compute)
-----------------------------------------------
* RoPE is TVM's Llama RoPE (``llama_rope_with_position_map``, rotate-half, default or llama3
  scaling) operation by operation in float32: ``e = float32((2 d) % D) / float32(D)``, default
  ``freq = float32(pos) / pow(float32(theta), e)``; llama3 (``rope_scaling`` with rope_type
  "llama3") ``f = 1 / pow(theta, e)``, ``smooth = max(0, min(1, alpha * f - beta))``, ``freq =
  float32(pos) * ((1 - smooth) * f * (1 / factor) + smooth * f)`` with ``alpha = orig_max /
  (2 pi) / (high - low)``, ``beta = low / (high - low)`` and ``1 / factor`` rounded to float32
  from float64 as TVM rounds them; then ``y = cos(freq) * x[d] + sin(freq) * rot[d]`` with
  ``rot[d] = -x[d + D/2]`` for ``d < D/2`` and ``x[d - D/2]`` above, rounded to float16. The
  kernels call the target's ``powf``/``cosf``/``sinf`` exactly as TVM's kernel does, so on one
  target the rotated q, and the K an FP16 cache holds, are bit for bit the numbers TVM's own KV
  cache produces (the tests check this on LLVM); `rope_ref` rounds those functions correctly and
  so differs in the last float16 bit on a few values per million.
* K and V are quantized from those float16 values (K after its float16 rounding): the FP16
  mode then holds exactly what TIRPagedKVCache holds, and the INT4/INT8 modes quantize the
  same numbers. Codes, scales and zeros are bit-identical to `formats.quantize_kv_asym`
  (min/max, the float16 roundings and the float32 reciprocal are all exact IEEE operations;
  ``rint`` is the 1.5 * 2**23 addition, see `_code`). The references call formats' functions.
* Attention dequantizes ``float32(q) * float32(scale) + float32(zero)`` on the fly and keeps
  everything in float32: scores ``(q . k) * (1 / sqrt(D))``, softmax in the online form (per
  page: the page's max, then ``m' = max(m, page max)``, ``l' = l e^(m - m') + sum e^(s - m')``,
  ``acc' = acc e^(m - m') + sum e^(s - m') v``), output ``acc / l`` rounded to float16. The
  reference is float64 on the same dequantized values, so kernel and reference differ by the
  final float16 rounding plus float32 accumulation error (measured below 4e-6 * max|V|).
* GQA: query head ``h`` reads KV head ``h // (H_q / H_kv)``; each task dequantizes a page of
  its KV head once and scores it for all the query heads of the group.

Variants
--------
``cpu``: LLVM builds for CI. `append`: one parallel task per new token. `decode`: one task per
(sequence, KV head, split), the sequence's pages cut into `DECODE_SPLITS` contiguous ranges
whose partial (max, sum, accumulator) a second parallel loop merges, so a batch of one long
sequence still fills the cores. `prefill`: one task per (new token, KV head), which walks the
pages up to its causal limit.

``cuda`` (hand-written TIR with explicit threads):
`decode` of INT4 pages of 16 tokens with groups of up to 8 query heads runs on fp16 tensor cores
(`_decode_tensor_core_body` has the fragment layout): per page a warp computes the 16 tokens'
scores and their P.V contribution as ``mma.sync m16n8k16`` with the 4-bit codes as exact float16
operands (K's as subnormals, one LOP3 per two codes; V's as integers, one LOP3 and one
HSUB2/HFMA2), ``P' = p * scale_v`` split into float16 hi + lo halves (about 22 bits; without GQA
the two columns of one MMA), each page's P.V accumulated afresh and added with a rounded FFMA;
each warp streams its pages through a 4-page shared-memory ring (cp.async, 16 bytes a lane);
four warps per (sequence, KV head, split) block merge like the slots below and write an
unsplit batch's output themselves. Every other
`decode` (INT8, FP16, larger groups, other page sizes):
one block per (sequence, KV head, split), the sequence's pages cut into up to
`CUDA_DECODE_SPLITS` ranges only while the batch leaves the GPU short of blocks, so a page of
K/V is read once for all G query heads of its group. A thread owns a chunk (4 to 16 bytes, see
`_decode_cuda_layout`) of one token row and extracts each code once for all G heads (the
2**23-mantissa trick, no integer-to-float conversion); the C chunk lanes of a row reduce the
score by XOR shuffles, and the block's Z token slots (about 128 threads) each keep an online
softmax over every Z-th token, rescaled when a token raises the max (the same math as above in
another float32 order, with scale and zero factored out of the element sums). Loads run a
few tokens ahead in a register ring. The slots merge through shared memory, the splits in a
second small kernel; ``/`` is ``__fdiv_rn`` and ``exp`` nvcc's fast ``__expf`` (a few ulp),
well inside the tolerance. H200 speeds: docs/bench/attention.md.
`append`: one block per token (4 to 32 warps by token count, `_APPEND_TIERS`), one warp per
row; codes, scales and zeros follow the cpu rule
bit for bit (``__frcp_rn`` for the reciprocal), but RoPE takes pow/cos/sin in float64 (see
`_append_cuda_body`), so its rotated q and K are `rope_ref`'s values, which differ from the
cpu variant's libm RoPE by one float16 ulp on a few values per million (and the K codes of
those rows may then differ); tested bit-exact against `rope_ref` and `write_pages_ref`.
`prefill` (16-token pages): one block of 128 threads per (tile of 64 // G new tokens of one
sequence, KV head), so the 64 query rows of a tile (tokens x the G heads of the group) share
each page it reads; per page the block dequantizes K and V into shared memory as float32,
scores 8 rows x 1 token per thread (float4 shared loads), takes the page's max and sum per row
by shuffles (the cpu variant's per-page online softmax), and accumulates P.V in registers (4
rows x D/8 columns per thread). All arithmetic is float32 on CUDA cores: fp16 tensor-core
operands would round the dequantized K/V and P to 11 bits, far outside the tolerance the cpu
variant meets. `copy_pages`: one block per (pair, layer), 16-byte copies.
"""

from __future__ import annotations

import math

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from atom_tvm.errors import UserError
from atom_tvm.quantization.formats import dequantize_kv_asym, quantize_kv_asym
from tir_kernels.gemm_common import by_rows
from tir_kernels.quantize import _byte_perm, _pair

__all__ = [
    "VARIANTS",
    "KV_BITS",
    "HEAD_DIMS",
    "PAGE_SIZE",
    "DECODE_SPLITS",
    "CUDA_DECODE_SPLITS",
    "page_shapes",
    "rope_ref",
    "write_pages_ref",
    "append_ref",
    "dequantize_pages_ref",
    "attention_ref",
    "copy_pages_ref",
    "append",
    "decode",
    "prefill",
    "copy_pages",
]

VARIANTS = ("cpu", "cuda")
KV_BITS = (4, 8, 16)
HEAD_DIMS = (64, 128)
PAGE_SIZE = 16
#: Page ranges a decode task list is split into per (sequence, KV head); see Variants.
DECODE_SPLITS = 4
#: 1.5 * 2**23: adding it to a float32 in [0, 2**22] rounds to an integer (ties to even) that
#: sits in the low mantissa bits.
_ROUND_MAGIC = 1.5 * 2**23
#: The running max before any score: finite, so that e^(m - m') is 0 and never NaN.
_NEG_BIG = -3.0e38
#: Most page ranges per (sequence, KV head) of the cuda decode kernel (see `_decode_splits`):
#: 16 ranges keep an H100's 132 SMs busy from a batch of one sequence on 8 KV heads.
CUDA_DECODE_SPLITS = 16
#: Threads a cuda decode block aims at (whole warps; see `_decode_cuda_layout`).
_DECODE_THREADS = 128
#: Blocks the cuda decode grid aims at before it splits sequences into page ranges (about 8
#: per SM of an H100/H200).
_DECODE_BLOCKS = 1024
#: Warps of a cuda append block (one token; the warps take its rows of q, K and V in turn) by
#: token count n, ``(largest n, warps)``: the most warps per token whose blocks all fit on the GPU
#: at once (132 SMs: 2 blocks of 32 warps, 8 of 8, 16 of 4 per SM), so a decode step's few tokens
#: spread their rows over many warps and long prompts keep small blocks. On an H100, a 13B decode
#: token took 14.4 us with 4 warps and 5.3 us with 32; 4096 tokens 90 us with 4, 109 with 32
#: (docs/bench/attention.md).
_APPEND_TIERS = ((256, 32), (1024, 8), (None, 4))
_WARP = 32
_FULL_MASK = 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------


def page_shapes(num_layers: int, num_pages: int, num_kv_heads: int, head_dim: int, kv_bits: int,
                page_size: int = PAGE_SIZE) -> list[tuple[tuple[int, ...], str]]:
    """Shapes and dtypes of the page buffers of all layers, in kernel argument order."""
    _check(kv_bits, num_kv_heads, num_kv_heads, head_dim, page_size)
    if num_layers <= 0 or num_pages <= 0:
        raise UserError(f"a KV cache needs at least one layer and one page, got {num_layers} "
                        f"layers and {num_pages} pages")
    rows = (num_layers, num_pages, 2, num_kv_heads, page_size)
    if kv_bits == 16:
        return [((*rows, head_dim), "float16")]
    return [((*rows, head_dim * kv_bits // 8), "uint8"), ((*rows, 2), "float16")]


def _check(kv_bits: int, num_q_heads: int, num_kv_heads: int, head_dim: int, page_size: int):
    if kv_bits not in KV_BITS:
        raise UserError(f"{kv_bits}-bit KV cache is not supported; use one of {KV_BITS}")
    if head_dim not in HEAD_DIMS:
        raise UserError(f"head_dim {head_dim} is not supported; use one of {HEAD_DIMS}")
    if num_kv_heads <= 0 or num_q_heads % num_kv_heads:
        raise UserError(f"{num_q_heads} query heads do not split into groups of {num_kv_heads} KV heads")
    if page_size <= 0:
        raise UserError(f"page size must be positive, got {page_size}")


def _view(buf, shape, dtype: str, elem_offset):
    """A compact buffer over ``buf``'s memory with 64-bit strides: the page buffers of all
    layers pass 2**31 elements well before they fill a GPU, so their index arithmetic must not
    be int32 (the strides make every flattened index int64 from the first product on)."""
    strides, size = [], T.int64(1)
    for dim in reversed(shape):
        strides.insert(0, size)
        size = size * T.Cast("int64", dim)
    return T.decl_buffer(shape, dtype, data=buf.data, strides=strides, elem_offset=elem_offset)


def _layer_view(pages, layer):
    """Layer ``layer`` of an ``[L, pages, 2, H_kv, P, X]`` page buffer as ``[pages, 2, H_kv,
    P, X]`` (what the kernel bodies index)."""
    shape = pages.shape[1:]
    size = T.int64(1)
    for dim in shape:
        size = size * T.Cast("int64", dim)
    return _view(pages, shape, pages.dtype, T.Cast("int64", layer) * size)


def _word_view(pages):
    """A layer view (`_layer_view`) reinterpreted as uint32 words along its last axis; every
    row is a multiple of 4 bytes (D * bits / 8 codes, 2 float16 scales, D float16 values)."""
    per_word = {"uint8": 4, "float16": 2}[str(pages.dtype)]
    return _view(pages, (*pages.shape[:-1], pages.shape[-1] // per_word), "uint32",
                 pages.elem_offset // per_word)


# ---------------------------------------------------------------------------------------------
# numpy references
# ---------------------------------------------------------------------------------------------


def rope_ref(x: np.ndarray, positions: np.ndarray, theta: float,
             rope_scaling: dict | None = None) -> np.ndarray:
    """float16 RoPE of ``x [n, H, D]`` at ``positions [n]``, TVM's float32 operations
    (``rope_scaling`` as `append` takes it).

    ``pow``, ``cos`` and ``sin`` are taken in float64 and rounded to float32 (what a correctly
    rounded libm returns). The kernels call the target's libm, as TVM's RoPE kernel does; it is
    not correctly rounded, so a few float16 results in a million differ by one ulp from this
    reference, while `append` and TVM's kernel agree bit for bit on the same target.
    """
    x = np.asarray(x, np.float16)
    dim = x.shape[-1]
    d = np.arange(dim)
    exponent = ((2 * d) % dim).astype(np.float32) / np.float32(dim)
    denom = np.power(np.float64(np.float32(theta)), exponent.astype(np.float64)).astype(np.float32)
    pos = np.asarray(positions).astype(np.float32)[:, None]
    llama3 = _llama3_constants(rope_scaling)
    if llama3 is None:
        freq = pos / denom[None, :]
    else:
        alpha, beta, inv_factor = (np.float32(c) for c in llama3)
        orig = np.float32(1) / denom
        smooth = np.clip(alpha * orig - beta, np.float32(0), np.float32(1))
        freq = pos * ((np.float32(1) - smooth) * orig * inv_factor + smooth * orig)[None, :]
    cos = np.cos(freq.astype(np.float64)).astype(np.float32)[:, None, :]
    sin = np.sin(freq.astype(np.float64)).astype(np.float32)[:, None, :]
    half = dim // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (cos * x.astype(np.float32) + sin * rot.astype(np.float32)).astype(np.float16)


def write_pages_ref(pages: tuple, layer: int, slots: np.ndarray, k: np.ndarray, v: np.ndarray,
                    kv_bits: int) -> tuple:
    """Pages with float16 rows ``k, v [n, H_kv, D]`` stored (quantized) at ``slots [n]`` of
    ``layer``; ``pages`` (as `page_shapes`) is not modified."""
    page_size = pages[0].shape[4]
    page, off = np.asarray(slots) // page_size, np.asarray(slots) % page_size
    pages = tuple(p.copy() for p in pages)
    for which, x in ((0, k), (1, v)):
        if kv_bits == 16:
            pages[0][layer, page, which, :, off] = x
        else:
            codes, scale, zero = quantize_kv_asym(x, kv_bits)
            pages[0][layer, page, which, :, off] = codes
            pages[1][layer, page, which, :, off] = np.concatenate([scale, zero], axis=-1)
    return pages


def append_ref(qkv: np.ndarray, positions: np.ndarray, slots: np.ndarray, pages: tuple,
               layer: int, num_q_heads: int, num_kv_heads: int, rope_theta: float,
               kv_bits: int, rope_scaling: dict | None = None) -> tuple[np.ndarray, tuple]:
    """What `append` computes: ``(q_rot, new pages)``; ``pages`` is not modified."""
    qkv = np.asarray(qkv, np.float16)
    hq, hkv = num_q_heads, num_kv_heads
    q_rot = rope_ref(qkv[:, :hq], positions, rope_theta, rope_scaling)
    k_rot = rope_ref(qkv[:, hq:hq + hkv], positions, rope_theta, rope_scaling)
    return q_rot, write_pages_ref(pages, layer, slots, k_rot, qkv[:, hq + hkv:], kv_bits)


def copy_pages_ref(pages: tuple, src_pages: np.ndarray, dst_pages: np.ndarray) -> tuple:
    """What `copy_pages` computes: every layer's page ``src[i]`` copied to ``dst[i]``, in
    order; ``pages`` is not modified."""
    pages = tuple(p.copy() for p in pages)
    for src, dst in zip(src_pages, dst_pages):
        for p in pages:
            p[:, dst] = p[:, src]
    return pages


def dequantize_pages_ref(pages: tuple, kv_bits: int) -> np.ndarray:
    """float32 values ``[..., 2, H_kv, P, D]`` the attention kernels read from page buffers
    (all layers' or one layer's)."""
    if kv_bits == 16:
        return pages[0].astype(np.float32)
    codes, scale_zero = pages
    return dequantize_kv_asym(codes, scale_zero[..., 0:1], scale_zero[..., 1:2], kv_bits)


def attention_ref(q: np.ndarray, qo_indptr: np.ndarray, pages: tuple, layer: int,
                  page_indptr: np.ndarray, page_indices: np.ndarray, last_page_len: np.ndarray,
                  kv_bits: int) -> np.ndarray:
    """float64 causal attention of ragged ``q [n, H_q, D]`` over ``layer``'s paged K/V (both kernels).

    Query ``i`` of a sequence with ``l`` queries and ``L`` cached tokens sees tokens
    ``0 .. L - l + i``; decode is ``qo_indptr = arange(B + 1)``.
    """
    kv = dequantize_pages_ref(tuple(p[layer] for p in pages), kv_bits).astype(np.float64)
    page_size = kv.shape[3]
    n, hq, dim = q.shape
    hkv = kv.shape[2]
    out = np.zeros((n, hq, dim))
    for b in range(len(last_page_len)):
        ids = page_indices[page_indptr[b]:page_indptr[b + 1]]
        length = (len(ids) - 1) * page_size + last_page_len[b]
        # [2, H_kv, L, D] with the sequence's tokens in order, each KV head repeated for its group.
        seq = kv[ids].transpose(1, 2, 0, 3, 4).reshape(2, hkv, -1, dim)[:, :, :length]
        seq = np.repeat(seq, hq // hkv, axis=1)
        q0, q1 = qo_indptr[b], qo_indptr[b + 1]
        qb = q[q0:q1].astype(np.float64).transpose(1, 0, 2)  # [H_q, l, D]
        scores = qb @ seq[0].transpose(0, 2, 1) / math.sqrt(dim)
        visible = np.arange(length)[None, :] <= (length - (q1 - q0) + np.arange(q1 - q0))[:, None]
        scores = np.where(visible[None], scores, -np.inf)
        probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        out[q0:q1] = (probs @ seq[1]).transpose(1, 0, 2)
    return out


# ---------------------------------------------------------------------------------------------
# Scalar steps shared by the kernels (plain Python building TIR expressions)
# ---------------------------------------------------------------------------------------------


def _load(kv_bits: int, codes, scale_zero, page, which, head, t, d):
    """float32 value of element d of token t's row (K if which == 0, else V), dequantized."""
    if kv_bits == 16:
        return T.Cast("float32", codes[page, which, head, t, d])
    if kv_bits == 8:
        code = T.Cast("int32", codes[page, which, head, t, d])
    else:
        byte = T.Cast("int32", codes[page, which, head, t, d // 2])
        code = T.bitwise_and(T.shift_right(byte, 4 * (d % 2)), 15)
    return (T.Cast("float32", code) * T.Cast("float32", scale_zero[page, which, head, t, 0])
            + T.Cast("float32", scale_zero[page, which, head, t, 1]))


def _code(x, zero, recip, qmax: int):
    """int32 code clamp(rint((x - zero) * recip), 0, qmax) (formats.quantize_kv_asym's rule).

    Clamping before rounding equals clamping after (the bounds are integers); for t in
    [0, qmax] the float32 sum t + 1.5 * 2**23 is rounded to the integer nearest t, ties to even
    like numpy's rint, and that integer is the low mantissa bits of the sum.
    """
    t = T.max(T.min((x - T.Cast("float32", zero)) * recip, T.float32(qmax)), T.float32(0))
    return T.bitwise_and(T.reinterpret("int32", t + T.float32(_ROUND_MAGIC)), 255)


def _llama3_constants(rope_scaling: dict | None) -> tuple[float, float, float] | None:
    """(alpha, beta, 1 / factor) of llama3 RoPE scaling, each rounded to float32 from the
    float64 value TVM's ``rope_freq_llama3`` computes; None for the default RoPE."""
    rope_type = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise UserError(f"RoPE scaling {rope_type!r} is not supported; use 'llama3' or none")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in rope_scaling]
    if missing:
        raise UserError(f"llama3 rope_scaling lacks {', '.join(missing)}; give all of {', '.join(keys)}")
    factor, low, high, orig_max = (float(rope_scaling[k]) for k in keys)
    if factor <= 0 or high <= low:
        raise UserError(f"llama3 rope_scaling needs factor > 0 and high_freq_factor > "
                        f"low_freq_factor, got {factor}, {low}, {high}")
    inv_diff = 1.0 / (high - low)
    return tuple(float(np.float32(c)) for c in (orig_max / (2 * math.pi) * inv_diff,
                                                 low * inv_diff, 1.0 / factor))


def _rope(x, s, h, d, pos, dim: int, theta: float, llama3):
    """float32 RoPE of element d of x[s, h, :] at position pos (module docstring formula);
    ``llama3`` is `_llama3_constants`' answer."""
    exponent = T.Cast("float32", (d * 2) % dim) / T.float32(dim)
    if llama3 is None:
        freq = T.Cast("float32", pos) / T.pow(T.float32(theta), exponent)
    else:
        alpha, beta, inv_factor = llama3
        orig = T.float32(1) / T.pow(T.float32(theta), exponent)
        smooth = T.max(T.float32(0), T.min(T.float32(1), T.float32(alpha) * orig - T.float32(beta)))
        freq = T.Cast("float32", pos) * ((T.float32(1) - smooth) * orig * T.float32(inv_factor)
                                         + smooth * orig)
    rot = T.if_then_else(d < dim // 2, -x[s, h, d + dim // 2], x[s, h, d - dim // 2])
    return T.cos(freq) * T.Cast("float32", x[s, h, d]) + T.sin(freq) * T.Cast("float32", rot)


# ---------------------------------------------------------------------------------------------
# append
# ---------------------------------------------------------------------------------------------


def append(kv_bits: int, num_q_heads: int, num_kv_heads: int, head_dim: int, rope_theta: float,
           page_size: int = PAGE_SIZE, variant: str = "cpu",
           rope_scaling: dict | None = None) -> tirx.PrimFunc:
    """RoPE + quantize-into-pages. ``rope_scaling``: None (or rope_type "default") or a Hugging
    Face llama3 dict (rope_type "llama3", factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings). Arguments: ``qkv float16 [n, H_q + 2 H_kv, D]``,
    ``positions int32 [n]``, ``slots int32 [n]`` (page * P + offset), the page buffers of
    `page_shapes` (written in place at the slots of layer ``layer``), ``layer int32``, ``q_rot
    float16 [n, H_q, D]`` (written)."""
    _check(kv_bits, num_q_heads, num_kv_heads, head_dim, page_size)
    _check_variant(variant)
    HQ, HKV, D, P = num_q_heads, num_kv_heads, head_dim, page_size
    qmax = (1 << kv_bits) - 1
    # float32(1 / qmax) rounded once, as formats rounds it.
    inv_qmax = float(np.float32(1 / qmax))
    theta = float(np.float32(rope_theta))
    llama3 = _llama3_constants(rope_scaling)

    if variant == "cuda":
        body = by_rows([(lambda n, most=most: n <= most,
                         _append_cuda_body(kv_bits, HQ, HKV, D, theta, llama3, P, warps))
                        for most, warps in _APPEND_TIERS])
    else:
        @T.macro
        def store_row(row, codes, scale_zero, page, which, head, off):
            if kv_bits == 16:
                for d in range(D):
                    codes[page, which, head, off, d] = T.Cast("float16", row[d])
            else:
                lo: T.float32 = row[0]
                hi: T.float32 = row[0]
                for d in range(1, D):
                    lo = T.min(lo, row[d])
                    hi = T.max(hi, row[d])
                zero = T.Cast("float16", lo)
                scale = T.Cast("float16", T.max(hi - T.Cast("float32", zero), T.float32(0))
                               * T.float32(inv_qmax))
                recip = T.Select(scale == T.float16(0), T.float32(0),
                                 T.float32(1) / T.Cast("float32", scale))
                scale_zero[page, which, head, off, 0] = scale
                scale_zero[page, which, head, off, 1] = zero
                if kv_bits == 8:
                    for d in range(D):
                        codes[page, which, head, off, d] = T.Cast("uint8", _code(row[d], zero, recip, qmax))
                else:
                    for j in range(D // 2):
                        codes[page, which, head, off, j] = T.Cast("uint8", T.bitwise_or(
                            _code(row[2 * j], zero, recip, qmax),
                            T.shift_left(_code(row[2 * j + 1], zero, recip, qmax), 4)))

        @T.macro
        def body(n, QKV, Pos, Slots, QRot, codes, scale_zero):
            for s in T.parallel(n):
                row = T.decl_buffer((D,), "float32")
                page = Slots[s] // P
                off = Slots[s] % P
                for h, d in T.grid(HQ, D):
                    QRot[s, h, d] = T.Cast("float16", _rope(QKV, s, h, d, Pos[s], D, theta, llama3))
                for h in range(HKV):
                    # K is rounded to float16 first: the value an FP16 cache would hold.
                    for d in range(D):
                        row[d] = T.Cast("float32", T.Cast(
                            "float16", _rope(QKV, s, HQ + h, d, Pos[s], D, theta, llama3)))
                    store_row(row, codes, scale_zero, page, 0, h, off)
                    for d in range(D):
                        row[d] = T.Cast("float32", QKV[s, HQ + HKV + h, d])
                    store_row(row, codes, scale_zero, page, 1, h, off)

    width = D * kv_bits // 8
    if kv_bits == 16:

        @T.prim_func
        def func(qkv_h: T.handle, pos_h: T.handle, slot_h: T.handle, data_h: T.handle,
                 layer: T.int32, q_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            n = T.int32()
            num_layers = T.int32()
            num_pages = T.int32()
            QKV = T.match_buffer(qkv_h, (n, HQ + 2 * HKV, D), "float16")
            Pos = T.match_buffer(pos_h, (n,), "int32")
            Slots = T.match_buffer(slot_h, (n,), "int32")
            Data = T.match_buffer(data_h, (num_layers, num_pages, 2, HKV, P, D), "float16")
            QRot = T.match_buffer(q_h, (n, HQ, D), "float16")
            data = _layer_view(Data, layer)
            body(n, QKV, Pos, Slots, QRot, data, None)

    else:

        @T.prim_func
        def func(qkv_h: T.handle, pos_h: T.handle, slot_h: T.handle, codes_h: T.handle,
                 sz_h: T.handle, layer: T.int32, q_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            n = T.int32()
            num_layers = T.int32()
            num_pages = T.int32()
            QKV = T.match_buffer(qkv_h, (n, HQ + 2 * HKV, D), "float16")
            Pos = T.match_buffer(pos_h, (n,), "int32")
            Slots = T.match_buffer(slot_h, (n,), "int32")
            Codes = T.match_buffer(codes_h, (num_layers, num_pages, 2, HKV, P, width), "uint8")
            SZ = T.match_buffer(sz_h, (num_layers, num_pages, 2, HKV, P, 2), "float16")
            QRot = T.match_buffer(q_h, (n, HQ, D), "float16")
            codes = _layer_view(Codes, layer)
            scale_zero = _layer_view(SZ, layer)
            body(n, QKV, Pos, Slots, QRot, codes, scale_zero)

    name = f"kv_append_int{kv_bits}_q{HQ}_kv{HKV}_d{D}_p{P}_{variant}"
    return func.with_attr("global_symbol", name)


# ---------------------------------------------------------------------------------------------
# attention (decode and prefill share the page walk)
# ---------------------------------------------------------------------------------------------


def _attend_macro(kv_bits: int, num_q_heads: int, num_kv_heads: int, head_dim: int, page_size: int):
    """The page walk of one task: query rows ``Q[row, hk*G : (hk+1)*G]`` against the tokens
    ``[p0 * P, kv_end)`` of sequence b, pages p0 .. p1-1, into online-softmax state m, l, acc."""
    G, D, P = num_q_heads // num_kv_heads, head_dim, page_size
    sm_scale = float(np.float32(1 / math.sqrt(D)))

    @T.macro
    def attend(Q, row, hk, codes, scale_zero, Indptr, Indices, b, p0, p1, kv_end, m, l, acc):
        qf = T.decl_buffer((G, D), "float32")
        kf = T.decl_buffer((P, D), "float32")
        vf = T.decl_buffer((P, D), "float32")
        sc = T.decl_buffer((P,), "float32")
        for g, d in T.grid(G, D):
            qf[g, d] = T.Cast("float32", Q[row, hk * G + g, d])
        for g in range(G):
            m[g] = T.float32(_NEG_BIG)
            l[g] = T.float32(0)
            for d in range(D):
                acc[g, d] = T.float32(0)
        for pi in range(T.max(p1 - p0, 0)):
            page = Indices[Indptr[b] + p0 + pi]
            ntok = T.min(P, kv_end - (p0 + pi) * P)
            # Dequantized once per page, then used by all G query heads of the group.
            for t, d in T.grid(ntok, D):
                kf[t, d] = _load(kv_bits, codes, scale_zero, page, 0, hk, t, d)
                vf[t, d] = _load(kv_bits, codes, scale_zero, page, 1, hk, t, d)
            for g in range(G):
                page_max: T.float32 = T.float32(_NEG_BIG)
                for t in range(ntok):
                    dot: T.float32 = T.float32(0)
                    for d in range(D):
                        dot = dot + qf[g, d] * kf[t, d]
                    sc[t] = dot * T.float32(sm_scale)
                    page_max = T.max(page_max, sc[t])
                m_new = T.max(m[g], page_max)
                correction = T.exp(m[g] - m_new)
                l[g] = l[g] * correction
                for d in range(D):
                    acc[g, d] = acc[g, d] * correction
                for t in range(ntok):
                    p = T.exp(sc[t] - m_new)
                    l[g] = l[g] + p
                    for d in range(D):
                        acc[g, d] = acc[g, d] + p * vf[t, d]
                m[g] = m_new

    return attend


def decode(kv_bits: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
           page_size: int = PAGE_SIZE, variant: str = "cpu") -> tirx.PrimFunc:
    """Decode attention. Arguments: ``q float16 [B, H_q, D]`` (rotated), the page buffers,
    ``layer int32``, ``page_indptr int32 [B+1]``, ``page_indices int32 [total]``, ``last_page_len int32 [B]``,
    ``out float16 [B, H_q, D]`` (written). Every sequence needs at least one token."""
    _check(kv_bits, num_q_heads, num_kv_heads, head_dim, page_size)
    _check_variant(variant)
    HQ, HKV, D, P, S = num_q_heads, num_kv_heads, head_dim, page_size, DECODE_SPLITS
    G = HQ // HKV
    if variant == "cuda" and _uses_tensor_core_decode(kv_bits, G, P):
        body = _decode_tensor_core_body(HQ, HKV, D, P)
    elif variant == "cuda":
        body = _decode_cuda_body(kv_bits, HQ, HKV, D, P)
    else:
        attend = _attend_macro(kv_bits, HQ, HKV, D, P)

        @T.macro
        def body(Q, codes, scale_zero, Indptr, Indices, LastLen, Out, B):
            # Per (sequence, query head, split): the split's max and sum, then its accumulator.
            part_ml = T.decl_buffer((B, HQ, S, 2), "float32")
            part_acc = T.decl_buffer((B, HQ, S, D), "float32")
            for task in T.parallel(B * HKV * S):
                b = task // (HKV * S)
                hk = task // S % HKV
                split = task % S
                num = Indptr[b + 1] - Indptr[b]
                per = (num + S - 1) // S
                m = T.decl_buffer((G,), "float32")
                l = T.decl_buffer((G,), "float32")
                acc = T.decl_buffer((G, D), "float32")
                attend(Q, b, hk, codes, scale_zero, Indptr, Indices, b, split * per,
                       T.min(num, (split + 1) * per), (num - 1) * P + LastLen[b], m, l, acc)
                for g in range(G):
                    part_ml[b, hk * G + g, split, 0] = m[g]
                    part_ml[b, hk * G + g, split, 1] = l[g]
                    for d in range(D):
                        part_acc[b, hk * G + g, split, d] = acc[g, d]
            for task in T.parallel(B * HQ):
                b = task // HQ
                h = task % HQ
                m_all: T.float32 = part_ml[b, h, 0, 0]
                for split in range(1, S):
                    m_all = T.max(m_all, part_ml[b, h, split, 0])
                # An empty split has m = _NEG_BIG, l = 0, acc = 0, so its weight e^(m - m_all) is 0.
                l_all: T.float32 = T.float32(0)
                for split in range(S):
                    l_all = l_all + part_ml[b, h, split, 1] * T.exp(part_ml[b, h, split, 0] - m_all)
                for d in range(D):
                    o: T.float32 = T.float32(0)
                    for split in range(S):
                        o = o + part_acc[b, h, split, d] * T.exp(part_ml[b, h, split, 0] - m_all)
                    Out[b, h, d] = T.Cast("float16", o / l_all)

    width = D * kv_bits // 8
    if kv_bits == 16:

        @T.prim_func
        def func(q_h: T.handle, data_h: T.handle, layer: T.int32, indptr_h: T.handle,
                 indices_h: T.handle, last_h: T.handle, out_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            B = T.int32()
            num_layers = T.int32()
            num_pages = T.int32()
            total = T.int32()
            Q = T.match_buffer(q_h, (B, HQ, D), "float16")
            Data = T.match_buffer(data_h, (num_layers, num_pages, 2, HKV, P, D), "float16")
            Indptr = T.match_buffer(indptr_h, (B + 1,), "int32")
            Indices = T.match_buffer(indices_h, (total,), "int32")
            LastLen = T.match_buffer(last_h, (B,), "int32")
            Out = T.match_buffer(out_h, (B, HQ, D), "float16")
            data = _layer_view(Data, layer)
            body(Q, data, None, Indptr, Indices, LastLen, Out, B)

    else:

        @T.prim_func
        def func(q_h: T.handle, codes_h: T.handle, sz_h: T.handle, layer: T.int32,
                 indptr_h: T.handle, indices_h: T.handle, last_h: T.handle, out_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            B = T.int32()
            num_layers = T.int32()
            num_pages = T.int32()
            total = T.int32()
            Q = T.match_buffer(q_h, (B, HQ, D), "float16")
            Codes = T.match_buffer(codes_h, (num_layers, num_pages, 2, HKV, P, width), "uint8")
            SZ = T.match_buffer(sz_h, (num_layers, num_pages, 2, HKV, P, 2), "float16")
            Indptr = T.match_buffer(indptr_h, (B + 1,), "int32")
            Indices = T.match_buffer(indices_h, (total,), "int32")
            LastLen = T.match_buffer(last_h, (B,), "int32")
            Out = T.match_buffer(out_h, (B, HQ, D), "float16")
            codes = _layer_view(Codes, layer)
            scale_zero = _layer_view(SZ, layer)
            body(Q, codes, scale_zero, Indptr, Indices, LastLen, Out, B)

    name = f"kv_decode_int{kv_bits}_q{HQ}_kv{HKV}_d{D}_p{P}_{variant}"
    return func.with_attr("global_symbol", name)


def _prefill_cpu_body(kv_bits: int, HQ: int, HKV: int, D: int, P: int):
    """The cpu variant of `prefill`: one parallel task per (new token, KV head)."""
    G = HQ // HKV
    attend = _attend_macro(kv_bits, HQ, HKV, D, P)

    @T.macro
    def body(Q, QoIndptr, codes, scale_zero, Indptr, Indices, LastLen, Out, n, B):
        for task in T.parallel(n * HKV):
            i = task // HKV
            hk = task % HKV
            # The sequence of query i: how many sequences end at or before it (empty ones too).
            seq: T.int32 = 0
            for bb in range(B):
                if QoIndptr[bb + 1] <= i:
                    seq = bb + 1
            b = seq
            length = (Indptr[b + 1] - Indptr[b] - 1) * P + LastLen[b]
            kv_end = length - (QoIndptr[b + 1] - QoIndptr[b]) + (i - QoIndptr[b]) + 1
            m = T.decl_buffer((G,), "float32")
            l = T.decl_buffer((G,), "float32")
            acc = T.decl_buffer((G, D), "float32")
            attend(Q, i, hk, codes, scale_zero, Indptr, Indices, b, 0, (kv_end + P - 1) // P,
                   kv_end, m, l, acc)
            for g, d in T.grid(G, D):
                Out[i, hk * G + g, d] = T.Cast("float16", acc[g, d] / l[g])

    return body


def prefill(kv_bits: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
            page_size: int = PAGE_SIZE, variant: str = "cpu") -> tirx.PrimFunc:
    """Causal ragged prefill attention. Arguments: ``q float16 [n, H_q, D]`` (rotated),
    ``qo_indptr int32 [B+1]``, the page buffers, ``layer int32``, ``page_indptr``, ``page_indices``,
    ``last_page_len`` (the pages already hold the n new tokens), ``out float16 [n, H_q, D]``."""
    _check(kv_bits, num_q_heads, num_kv_heads, head_dim, page_size)
    _check_variant(variant)
    HQ, HKV, D, P = num_q_heads, num_kv_heads, head_dim, page_size
    if variant == "cuda":
        body = _prefill_cuda_body(kv_bits, HQ, HKV, D, P)
    else:
        body = _prefill_cpu_body(kv_bits, HQ, HKV, D, P)

    width = D * kv_bits // 8
    if kv_bits == 16:

        @T.prim_func
        def func(q_h: T.handle, qo_h: T.handle, data_h: T.handle, layer: T.int32,
                 indptr_h: T.handle, indices_h: T.handle, last_h: T.handle, out_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            n = T.int32()
            B = T.int32()
            num_layers = T.int32()
            num_pages = T.int32()
            total = T.int32()
            Q = T.match_buffer(q_h, (n, HQ, D), "float16")
            QoIndptr = T.match_buffer(qo_h, (B + 1,), "int32")
            Data = T.match_buffer(data_h, (num_layers, num_pages, 2, HKV, P, D), "float16")
            Indptr = T.match_buffer(indptr_h, (B + 1,), "int32")
            Indices = T.match_buffer(indices_h, (total,), "int32")
            LastLen = T.match_buffer(last_h, (B,), "int32")
            Out = T.match_buffer(out_h, (n, HQ, D), "float16")
            data = _layer_view(Data, layer)
            body(Q, QoIndptr, data, None, Indptr, Indices, LastLen, Out, n, B)

    else:

        @T.prim_func
        def func(q_h: T.handle, qo_h: T.handle, codes_h: T.handle, sz_h: T.handle,
                 layer: T.int32, indptr_h: T.handle, indices_h: T.handle, last_h: T.handle,
                 out_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            n = T.int32()
            B = T.int32()
            num_layers = T.int32()
            num_pages = T.int32()
            total = T.int32()
            Q = T.match_buffer(q_h, (n, HQ, D), "float16")
            QoIndptr = T.match_buffer(qo_h, (B + 1,), "int32")
            Codes = T.match_buffer(codes_h, (num_layers, num_pages, 2, HKV, P, width), "uint8")
            SZ = T.match_buffer(sz_h, (num_layers, num_pages, 2, HKV, P, 2), "float16")
            Indptr = T.match_buffer(indptr_h, (B + 1,), "int32")
            Indices = T.match_buffer(indices_h, (total,), "int32")
            LastLen = T.match_buffer(last_h, (B,), "int32")
            Out = T.match_buffer(out_h, (n, HQ, D), "float16")
            codes = _layer_view(Codes, layer)
            scale_zero = _layer_view(SZ, layer)
            body(Q, QoIndptr, codes, scale_zero, Indptr, Indices, LastLen, Out, n, B)

    name = f"kv_prefill_int{kv_bits}_q{HQ}_kv{HKV}_d{D}_p{P}_{variant}"
    return func.with_attr("global_symbol", name)


# ---------------------------------------------------------------------------------------------
# copy_pages
# ---------------------------------------------------------------------------------------------


def copy_pages(kv_bits: int, num_kv_heads: int, head_dim: int, page_size: int = PAGE_SIZE,
               variant: str = "cpu") -> tirx.PrimFunc:
    """Copy-on-write after a fork: every layer's page ``src_pages[i]`` copied to ``dst_pages[i]``
    (K and V, codes and scales). Arguments: the page buffers (written in place), ``src_pages
    int32 [n]``, ``dst_pages int32 [n]`` (n >= 1). The copies run in parallel, so the dst pages
    must be distinct and none of them a src page."""
    _check(kv_bits, num_kv_heads, num_kv_heads, head_dim, page_size)
    _check_variant(variant)
    HKV, D, P = num_kv_heads, head_dim, page_size
    # 32-bit words of one layer's page in each page buffer (rows are whole words).
    words = [math.prod(shape[2:]) * (1 if dtype == "uint8" else 2) // 4
             for shape, dtype in page_shapes(1, 1, HKV, D, kv_bits, P)]
    threads = 256

    @T.macro
    def copy(pages, Src, Dst, n, num_layers, num_pages, words: int, vec: int):
        W = _view(pages, (num_layers, num_pages, words), "uint32", 0)
        if variant == "cuda":
            # One block per (pair, layer), `vec` words a load (16 bytes where they divide a page).
            with T.launch_thread("blockIdx.x", n * num_layers) as task:
                tx = T.launch_thread("threadIdx.x", threads)
                chunk = T.alloc_local((vec,), "uint32")
                layer = task % num_layers
                src = Src[task // num_layers]
                dst = Dst[task // num_layers]
                for it in range((words // vec + threads - 1) // threads):
                    # Written out, not named: codegen emits a vector load only where it can
                    # prove the word index a multiple of vec.
                    if (it * threads + tx) * vec < words:
                        for v in T.vectorized(vec):
                            chunk[v] = W[layer, src, (it * threads + tx) * vec + v]
                        for v in T.vectorized(vec):
                            W[layer, dst, (it * threads + tx) * vec + v] = chunk[v]
        else:
            for task in T.parallel(n * num_layers):
                for w in range(words):
                    W[task % num_layers, Dst[task // num_layers], w] = W[
                        task % num_layers, Src[task // num_layers], w]

    width = D * kv_bits // 8
    if kv_bits == 16:

        @T.prim_func
        def func(data_h: T.handle, src_h: T.handle, dst_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            n = T.int32()
            num_layers = T.int32()
            num_pages = T.int32()
            Data = T.match_buffer(data_h, (num_layers, num_pages, 2, HKV, P, D), "float16")
            Src = T.match_buffer(src_h, (n,), "int32")
            Dst = T.match_buffer(dst_h, (n,), "int32")
            copy(Data, Src, Dst, n, num_layers, num_pages, words[0], math.gcd(words[0], 4))

    else:

        @T.prim_func
        def func(codes_h: T.handle, sz_h: T.handle, src_h: T.handle, dst_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            n = T.int32()
            num_layers = T.int32()
            num_pages = T.int32()
            Codes = T.match_buffer(codes_h, (num_layers, num_pages, 2, HKV, P, width), "uint8")
            SZ = T.match_buffer(sz_h, (num_layers, num_pages, 2, HKV, P, 2), "float16")
            Src = T.match_buffer(src_h, (n,), "int32")
            Dst = T.match_buffer(dst_h, (n,), "int32")
            copy(Codes, Src, Dst, n, num_layers, num_pages, words[0], math.gcd(words[0], 4))
            copy(SZ, Src, Dst, n, num_layers, num_pages, words[1], math.gcd(words[1], 4))

    name = f"kv_copy_pages_int{kv_bits}_kv{HKV}_d{D}_p{P}_{variant}"
    return func.with_attr("global_symbol", name)


# ---------------------------------------------------------------------------------------------
# cuda: explicit threads (see the Variants section of the module docstring)
# ---------------------------------------------------------------------------------------------


def _shuffle_xor(value, lane_mask):
    return T.tvm_warp_shuffle_xor(T.uint32(_FULL_MASK), value, lane_mask, _WARP, _WARP)


def _fdiv(a, b):
    """IEEE a / b: TVM compiles with nvcc's --use_fast_math, which makes ``/`` approximate."""
    return T.call_pure_extern("float32", "__fdiv_rn", a, b)


def _rn(op: str, a, b):
    """float32 a op b rounded to nearest and never fused into an FMA (nvcc's --use_fast_math
    would contract a * b + c)."""
    return T.call_pure_extern("float32", f"__f{op}_rn", a, b)


def _chunk_value(kv_bits: int, words, e: int, base: int = 0):
    """float32 code (or float16 value) of element e of a chunk held as uint32 words from
    ``words[base]`` on; 4-bit
    codes sit low nibble first, so element e is bits 4e.. of the little-endian words."""
    per_word = 32 // kv_bits
    if kv_bits == 16:
        field = T.shift_right(words[base + e // per_word], T.uint32(16 * (e % 2)))
        return T.Cast("float32", T.reinterpret("float16", T.Cast("uint16", T.bitwise_and(
            field, T.uint32(0xFFFF)))))
    # The code becomes the low mantissa byte of 2**23 (one PRMT picks the byte and the exponent
    # byte 0x4B), an exact float32 without the quarter-rate integer-to-float conversion.
    # 4 bits: the even nibbles are the bytes of word & 0x0F0F0F0F, the odd of (word >> 4) & ...
    word = words[base + e // per_word]
    byte = (e % per_word) // (8 // kv_bits)
    if kv_bits == 4:
        word = T.bitwise_and(T.shift_right(word, T.uint32(4 * (e % 2))), T.uint32(0x0F0F0F0F))
    bits = _byte_perm(word, T.uint32(0x4B000000), 0x7540 | byte)
    return T.reinterpret("float32", bits) - T.float32(2.0**23)


def _scale(sz, i: int = 0):
    """float32 scale of a row: the low float16 half of its (scale, zero) word ``sz[i]``."""
    return T.Cast("float32", T.reinterpret("float16", T.Cast("uint16", T.bitwise_and(
        sz[i], T.uint32(0xFFFF)))))


def _zero(sz, i: int = 0):
    """float32 zero of a row: the high float16 half of its (scale, zero) word ``sz[i]``."""
    return T.Cast("float32", T.reinterpret("float16", T.Cast("uint16", T.shift_right(
        sz[i], T.uint32(16)))))


def _dequant(kv_bits: int, words, sz, e: int):
    """float32 value of element e of a chunk: ``code * scale + zero`` with (scale, zero) the
    two float16 halves of the 32-bit word ``sz[0]``."""
    value = _chunk_value(kv_bits, words, e)
    if kv_bits == 16:
        return value
    return value * _scale(sz) + _zero(sz)


def _append_cuda_body(kv_bits: int, HQ: int, HKV: int, D: int, theta: float, llama3, P: int,
                      warps: int):
    """The cuda variant of `append`: one block per token of up to ``warps`` warps, one warp per row
    of q, K or V at a time.

    Lane ``i`` holds elements ``i*E .. i*E+E-1`` (E = D / 32), so RoPE's partner element
    ``d -+ D/2`` is in lane ``i ^ 16`` and a row's min and max are 5-step shuffle reductions.
    ``pow``, ``cos`` and ``sin`` are taken in float64 and rounded to float32, the other steps
    with the round-to-nearest intrinsics, because nvcc's --use_fast_math (which TVM passes)
    turns float32 ``cosf``/``sinf``/``powf`` into approximations off by ~1e-4 at large
    positions; so the rotated q and K are `rope_ref`'s correctly rounded values (llama3
    scaling's float32 steps are taken with the same intrinsics, in TVM's order).
    """
    E, rows, half = D // _WARP, HQ + 2 * HKV, D // 2
    warps = min(warps, rows)
    qmax = (1 << kv_bits) - 1
    inv_qmax = float(np.float32(1 / qmax))

    @T.macro
    def body(n, QKV, Pos, Slots, QRot, codes, scale_zero):
        with T.launch_thread("blockIdx.x", n) as s:
            tx = T.launch_thread("threadIdx.x", warps * _WARP)
            lane = tx % _WARP
            cs = T.alloc_shared((half,), "float32")
            sn = T.alloc_shared((half,), "float32")
            xv = T.alloc_local((E,), "float16")
            y = T.alloc_local((E,), "float32")
            page = Slots[s] // P
            off = Slots[s] % P
            if tx < half:
                # (2 tx) / D is exact in float32 and float64 alike (D is a power of two).
                denom = T.Cast("float32", T.pow(T.float64(theta), T.Cast("float64", tx * 2)
                                                / T.float64(D)))
                pos = T.Cast("float32", Pos[s])
                if llama3 is None:
                    freq = T.Cast("float64", _fdiv(pos, denom))
                else:
                    alpha, beta, inv_factor = llama3
                    orig = _fdiv(T.float32(1), denom)
                    smooth = T.max(T.float32(0), T.min(T.float32(1), _rn(
                        "sub", _rn("mul", T.float32(alpha), orig), T.float32(beta))))
                    freq = T.Cast("float64", _rn("mul", pos, _rn("add", _rn("mul", _rn(
                        "mul", _rn("sub", T.float32(1), smooth), orig), T.float32(inv_factor)),
                        _rn("mul", smooth, orig))))
                cs[tx] = T.Cast("float32", T.cos(freq))
                sn[tx] = T.Cast("float32", T.sin(freq))
            T.tvm_storage_sync("shared")
            # Warp-uniform row loop: every lane of a warp reaches every shuffle.
            for ri in range((rows + warps - 1) // warps):
                r = ri * warps + tx // _WARP
                if r < rows:
                    for e in T.vectorized(E):
                        xv[e] = QKV[s, r, lane * E + e]
                    for e in T.unroll(E):
                        y[e] = T.Cast("float32", xv[e])
                    if r < HQ + HKV:
                        for e in T.unroll(E):
                            partner = _shuffle_xor(y[e], 16)
                            rot = T.Select(lane < 16, -partner, partner)
                            i = (lane * E + e) % half
                            y[e] = _rn("add", _rn("mul", cs[i], y[e]), _rn("mul", sn[i], rot))
                    if r < HQ:
                        for e in T.unroll(E):
                            QRot[s, r, lane * E + e] = T.Cast("float16", y[e])
                    else:
                        which = T.if_then_else(r < HQ + HKV, 0, 1)
                        hk = T.if_then_else(r < HQ + HKV, r - HQ, r - HQ - HKV)
                        # K is rounded to float16 first: the value an FP16 cache would hold
                        # (V already is a float16 value, which the rounding keeps).
                        for e in T.unroll(E):
                            y[e] = T.Cast("float32", T.Cast("float16", y[e]))
                        if kv_bits == 16:
                            for e in T.unroll(E):
                                codes[page, which, hk, off, lane * E + e] = T.Cast("float16", y[e])
                        else:
                            lo: T.float32 = y[0]
                            hi: T.float32 = y[0]
                            for e in T.unroll(1, E):
                                lo = T.min(lo, y[e])
                                hi = T.max(hi, y[e])
                            for k in T.unroll(5):
                                lo = T.min(lo, _shuffle_xor(lo, 16 >> k))
                                hi = T.max(hi, _shuffle_xor(hi, 16 >> k))
                            zero = T.Cast("float16", lo)
                            scale = T.Cast("float16", T.max(hi - T.Cast("float32", zero),
                                                            T.float32(0)) * T.float32(inv_qmax))
                            recip = T.Select(scale == T.float16(0), T.float32(0), T.call_pure_extern(
                                "float32", "__frcp_rn", T.Cast("float32", scale)))
                            if lane == 0:
                                scale_zero[page, which, hk, off, 0] = scale
                                scale_zero[page, which, hk, off, 1] = zero
                            if kv_bits == 8:
                                for e in T.unroll(E):
                                    codes[page, which, hk, off, lane * E + e] = T.Cast(
                                        "uint8", _code(y[e], zero, recip, qmax))
                            else:
                                for j in T.unroll(E // 2):
                                    codes[page, which, hk, off, lane * E // 2 + j] = T.Cast(
                                        "uint8", T.bitwise_or(
                                            _code(y[2 * j], zero, recip, qmax),
                                            T.shift_left(_code(y[2 * j + 1], zero, recip, qmax), 4)))

    return body


def _decode_cuda_layout(kv_bits: int, G: int, D: int) -> tuple[int, int, int, int]:
    """(E, W, C, Z): elements of a thread's chunk of a row, its 32-bit words, lanes per token
    row, token slots per block. A thread holds q and the accumulator of all G heads for its
    E elements, so G * E stays near 16 (registers, hence resident warps), with chunks of 4 to
    16 bytes and at most 32 lanes a row (a row's score is a shuffle reduction in one warp)."""
    E = 1 << (max(1, 16 // G).bit_length() - 1)
    E = min(max(E, 32 // kv_bits, D // _WARP), 128 // kv_bits)
    C = D // E
    # Whole warps only (the full-mask shuffles need all 32 lanes), about _DECODE_THREADS threads.
    Z = max(_WARP, _DECODE_THREADS) // C
    return E, E * kv_bits // 32, C, Z


def _decode_depth(kv_bits: int, G: int) -> int:
    """Register pipeline stages of a cuda decode thread (tokens whose loads are in flight), by
    measurement on the H200 (docs/bench/attention.md): 4 for 8-bit pages without GQA, where it
    took the bandwidth from 87% to 90%; elsewhere 4 stages cost resident warps and were slower
    (FP16 at 16 sequences, every GQA case) or no faster (INT4)."""
    return 4 if kv_bits == 8 and G == 1 else 2


def _decode_splits(B, HKV: int):
    """Page ranges per (sequence, KV head) at run time: enough blocks to fill the GPU
    (`_DECODE_BLOCKS`), at most `CUDA_DECODE_SPLITS`; a large batch takes one range, so it
    writes and merges no partial states it does not need."""
    return T.max(1, T.min(CUDA_DECODE_SPLITS, (_DECODE_BLOCKS + B * HKV - 1) // (B * HKV)))


def _merge_slots_macro(G: int, HKV: int, D: int, Z: int, threads: int, direct: bool):
    """``merge_slots(ms, ls, accs, tx, b, hk, split, part_ml, part_acc, Out, B)``: the Z slots'
    online softmax states of a cuda decode block (``ms``/``ls [Z * G]``, ``accs [Z * G, D]`` in
    shared memory, synchronized) merged into the split's partial state of each of the G heads;
    with ``direct``, when the sequences are not split, into the output instead (the bits
    `merge_splits` would write). The CUDA-core kernel does not take ``direct``: with it, nvcc
    compiled its FP16 GQA loop 1.6x slower on the H200."""

    @T.macro
    def merge_slots(ms, ls, accs, tx, b, hk, split, part_ml, part_acc, Out, B):
        for i in range((G * D + threads - 1) // threads):
            if tx + i * threads < G * D:
                gg = (tx + i * threads) // D
                d = (tx + i * threads) % D
                m_all: T.float32 = ms[gg]
                for zz in range(1, Z):
                    m_all = T.max(m_all, ms[zz * G + gg])
                l_all: T.float32 = T.float32(0)
                a_all: T.float32 = T.float32(0)
                for zz in range(Z):
                    weight: T.float32 = T.exp(ms[zz * G + gg] - m_all)
                    l_all = l_all + ls[zz * G + gg] * weight
                    a_all = a_all + accs[zz * G + gg, d] * weight
                if direct and _decode_splits(B, HKV) == 1:
                    Out[b, hk * G + gg, d] = T.Cast("float16", _fdiv(a_all, l_all))
                else:
                    part_acc[b, hk * G + gg, split, d] = a_all
                    if d == 0:
                        part_ml[b, hk * G + gg, split, 0] = m_all
                        part_ml[b, hk * G + gg, split, 1] = l_all

    return merge_slots


def _merge_splits_macro(HQ: int, HKV: int, D: int, direct: bool):
    """``merge_splits(part_ml, part_acc, Out, B)``: the second kernel of a cuda decode, which
    merges each (sequence, query head)'s split states and writes the float16 output; with
    ``direct`` one idle block when the sequences were not split (`merge_slots` wrote it then)."""

    @T.macro
    def merge_split_states(part_ml, part_acc, Out, B, bh, d):
        mb: T.float32 = part_ml[bh // HQ, bh % HQ, 0, 0]
        for split in range(1, _decode_splits(B, HKV)):
            mb = T.max(mb, part_ml[bh // HQ, bh % HQ, split, 0])
        # An empty split has m = _NEG_BIG, l = 0, acc = 0, so its weight e^(m - mb) is 0.
        lb: T.float32 = T.float32(0)
        o: T.float32 = T.float32(0)
        for split in range(_decode_splits(B, HKV)):
            wb: T.float32 = T.exp(part_ml[bh // HQ, bh % HQ, split, 0] - mb)
            lb = lb + part_ml[bh // HQ, bh % HQ, split, 1] * wb
            o = o + part_acc[bh // HQ, bh % HQ, split, d] * wb
        Out[bh // HQ, bh % HQ, d] = T.Cast("float16", _fdiv(o, lb))

    @T.macro
    def merge_splits(part_ml, part_acc, Out, B):
        if direct:
            with T.launch_thread("blockIdx.x", T.if_then_else(_decode_splits(B, HKV) > 1, B * HQ, 1)) as bh:
                d = T.launch_thread("threadIdx.x", D)
                if _decode_splits(B, HKV) > 1:
                    merge_split_states(part_ml, part_acc, Out, B, bh, d)
        else:
            with T.launch_thread("blockIdx.x", B * HQ) as bh:
                d = T.launch_thread("threadIdx.x", D)
                merge_split_states(part_ml, part_acc, Out, B, bh, d)

    return merge_splits


def _decode_cuda_body(kv_bits: int, HQ: int, HKV: int, D: int, P: int):
    """The cuda variant's body macro, arguments as the cpu body's.

    Every code a thread loads is extracted once and used for all G query heads of the group.
    With 4/8-bit pages the scale and zero are factored out of the element loops: a thread's
    part of the score is ``scale * sum(q * code) + zero * sum(q)`` (``sum(q)`` taken once), and
    of the output ``sum(p * scale * code)`` plus a per-slot ``sum(p * zero)`` added at the end,
    so an element costs its extraction and one FMA per head on each side. The accumulators
    are rescaled only when a token raises the running max. A thread keeps the chunks of its
    next `_decode_depth` tokens in registers (a ring unrolled over the loop), so that many loads
    are in flight: 8-byte INT4 chunks reach the bandwidth only that way.
    """
    G, S = HQ // HKV, CUDA_DECODE_SPLITS
    E, W, C, Z = _decode_cuda_layout(kv_bits, G, D)
    threads = C * Z
    # Partial sums per head of the score's dot product: independent FMA chains.
    NA = max(1, 4 // G)
    DEPTH = _decode_depth(kv_bits, G)
    sm_scale = float(np.float32(1 / math.sqrt(D)))
    quantized = kv_bits != 16
    merge_slots = _merge_slots_macro(G, HKV, D, Z, threads, direct=False)
    merge_splits = _merge_splits_macro(HQ, HKV, D, direct=False)

    @T.macro
    def load(codes, scale_zero, Indptr, Indices, b, hk, x, j, j1, kw, vw, ksz, vsz, stage: int):
        # Token j's chunks into pipeline stage `stage` of the word registers (zeros past j1).
        # 32-bit views of the pages: a chunk is W words, a row's (scale, zero) is one word.
        KVW = _word_view(codes)
        for w in T.unroll(W):
            kw[stage * W + w] = T.uint32(0)
            vw[stage * W + w] = T.uint32(0)
        ksz[stage] = T.uint32(0)
        vsz[stage] = T.uint32(0)
        if j < j1:
            page = Indices[Indptr[b] + j // P]
            for w in T.vectorized(W):
                kw[stage * W + w] = KVW[page, 0, hk, j % P, x * W + w]
            for w in T.vectorized(W):
                vw[stage * W + w] = KVW[page, 1, hk, j % P, x * W + w]
            if quantized:
                SZW = _word_view(scale_zero)
                ksz[stage] = SZW[page, 0, hk, j % P, 0]
                vsz[stage] = SZW[page, 1, hk, j % P, 0]

    @T.macro
    def step(j, j1, kw, vw, ksz, vsz, stage: int, qr, acc, qsum, m, l, zacc, dots, cv):
        # Token j (its chunks in stage `stage`) into the slot's online softmax of every head.
        for i in T.unroll(G * NA):
            dots[i] = T.float32(0)
        for e in T.unroll(E):
            cv[e] = _chunk_value(kv_bits, kw, e, stage * W)
            for g in T.unroll(G):
                dots[g * NA + e % NA] = dots[g * NA + e % NA] + qr[g * E + e] * cv[e]
        for e in T.unroll(E):
            cv[e] = _chunk_value(kv_bits, vw, e, stage * W)
        for g in T.unroll(G):
            dot: T.float32 = dots[g * NA]
            for a in T.unroll(1, NA):
                dot = dot + dots[g * NA + a]
            if quantized:
                dot = dot * _scale(ksz, stage) + qsum[g] * _zero(ksz, stage)
            for s in T.unroll(int(math.log2(C))):
                dot = dot + _shuffle_xor(dot, C >> (s + 1))
            if j < j1:
                score: T.float32 = dot * T.float32(sm_scale)
                if score > m[g]:
                    correction: T.float32 = T.exp(m[g] - score)
                    l[g] = l[g] * correction
                    zacc[g] = zacc[g] * correction
                    for e in T.unroll(E):
                        acc[g * E + e] = acc[g * E + e] * correction
                    m[g] = score
                p: T.float32 = T.exp(score - m[g])
                l[g] = l[g] + p
                if quantized:
                    zacc[g] = zacc[g] + p * _zero(vsz, stage)
                    p = p * _scale(vsz, stage)
                for e in T.unroll(E):
                    acc[g * E + e] = acc[g * E + e] + p * cv[e]

    @T.macro
    def body(Q, codes, scale_zero, Indptr, Indices, LastLen, Out, B):
        part_ml = T.decl_buffer((B, HQ, S, 2), "float32")
        part_acc = T.decl_buffer((B, HQ, S, D), "float32")
        with T.launch_thread("blockIdx.x", B * HKV * _decode_splits(B, HKV)) as task:
            tx = T.launch_thread("threadIdx.x", threads)
            b = task // (HKV * _decode_splits(B, HKV))
            hk = task // _decode_splits(B, HKV) % HKV
            split = task % _decode_splits(B, HKV)
            z = tx // C
            x = tx % C
            ms = T.alloc_shared((Z * G,), "float32")
            ls = T.alloc_shared((Z * G,), "float32")
            accs = T.alloc_shared((Z * G, D), "float32")
            num = Indptr[b + 1] - Indptr[b]
            per = (num + _decode_splits(B, HKV) - 1) // _decode_splits(B, HKV)
            j0 = split * per * P
            j1 = T.min(T.min(num, (split + 1) * per) * P, (num - 1) * P + LastLen[b])
            qr = T.alloc_local((G * E,), "float32")
            acc = T.alloc_local((G * E,), "float32")
            qsum = T.alloc_local((G,), "float32")
            m = T.alloc_local((G,), "float32")
            l = T.alloc_local((G,), "float32")
            zacc = T.alloc_local((G,), "float32")
            dots = T.alloc_local((G * NA,), "float32")
            cv = T.alloc_local((E,), "float32")
            kw = T.alloc_local((DEPTH * W,), "uint32")
            vw = T.alloc_local((DEPTH * W,), "uint32")
            ksz = T.alloc_local((DEPTH,), "uint32")
            vsz = T.alloc_local((DEPTH,), "uint32")
            for g in T.unroll(G):
                qsum[g] = T.float32(0)
                for e in T.unroll(E):
                    qr[g * E + e] = T.Cast("float32", Q[b, hk * G + g, x * E + e])
                    qsum[g] = qsum[g] + qr[g * E + e]
                    acc[g * E + e] = T.float32(0)
                m[g] = T.float32(_NEG_BIG)
                l[g] = T.float32(0)
                zacc[g] = T.float32(0)
            for stage in T.unroll(DEPTH):
                load(codes, scale_zero, Indptr, Indices, b, hk, x, j0 + stage * Z + z, j1, kw, vw,
                     ksz, vsz, stage)
            # Slot z takes tokens j0 + z, j0 + z + Z, ...; the trip count is the same for the
            # whole block, so that every lane reaches every shuffle. Step it * DEPTH + stage
            # reads stage `stage`, then refills it with the token DEPTH steps ahead.
            steps = T.max(j1 - j0 + Z - 1, 0) // Z
            for it in range((steps + DEPTH - 1) // DEPTH):
                for stage in T.unroll(DEPTH):
                    if it * DEPTH + stage < steps:
                        step(j0 + (it * DEPTH + stage) * Z + z, j1, kw, vw, ksz, vsz, stage, qr, acc,
                             qsum, m, l, zacc, dots, cv)
                        load(codes, scale_zero, Indptr, Indices, b, hk, x,
                             j0 + (it * DEPTH + stage + DEPTH) * Z + z, j1, kw, vw, ksz, vsz, stage)
            # The Z slots' states merge through shared memory into the split's partial state.
            for g in T.unroll(G):
                if x == 0:
                    ms[z * G + g] = m[g]
                    ls[z * G + g] = l[g]
                for e in T.unroll(E):
                    accs[z * G + g, x * E + e] = acc[g * E + e] + zacc[g]
            T.tvm_storage_sync("shared")
            merge_slots(ms, ls, accs, tx, b, hk, split, part_ml, part_acc, Out, B)
        merge_splits(part_ml, part_acc, Out, B)

    return body


#: Warps of a tensor-core INT4 decode block (`_decode_tensor_core_body`); each keeps its own
#: online softmax over every `_TC_WARPS`-th page of the block's range.
_TC_WARPS = 4
#: Pages of a tensor-core decode warp's shared-memory ring: each step waits for its page, computes
#: it and starts the copy (cp.async, 16 bytes a lane) of the page _TC_RING - 1 steps ahead, so
#: that many pages are in flight per warp without holding registers.
_TC_RING = 4
#: K's codes masked into the low bits of a float16 are the subnormals ``code * 2**-24`` (exact, no
#: offset to subtract); masked in place from a byte's high nibble ``code * 2**-20``. Multiplied by q
#: (a normal float16) they are exact; the score MMAs' results are scaled back in float32.
_LOW_NIBBLE_SCALE = float(2**24)
_HIGH_NIBBLE_SCALE = float(2**20)
#: V's codes become exact float16 integers instead, because their MMA partner, the low half of
#: P' = p * scale_v, is often subnormal itself, and products of two subnormals lost accuracy on
#: the H200 (a decode test failed at 1.07x its tolerance): 0x6400 is 1024, whose ulp is 1, so
#: ``0x6400 | code`` reads as 1024 + code, and a code in a byte's high nibble as 1024 + 16 code;
#: (1024 + 16 code) * (1/16) + (-64) = code exactly, in one FMA.
_F16X2_1024 = 0x64006400
_F16X2_SIXTEENTH = 0x2C002C00
_F16X2_MINUS_64 = 0xD400D400
#: Floats per head row of a warp's probability tile: 16 tokens + 4 of padding, so that the
#: transposing writes hit 32 distinct banks and the float4 reads stay 16-byte aligned.
_TC_P_STRIDE = 20
_MMA_F16 = "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"


def _uses_tensor_core_decode(kv_bits: int, G: int, P: int) -> bool:
    """Whether the cuda decode of this shape is `_decode_tensor_core_body`: INT4 pages of 16
    tokens (one page is one m16 tile) and groups of at most 8 query heads (one n8 tile)."""
    return kv_bits == 4 and G <= 8 and P == 16


def _codes_subnormal_f16x2(x, high):
    """The 4-bit codes in bits 0-3 and 16-19 of ``x`` (``high`` = 1: bits 4-7 and 20-23) as a
    float16 pair, low half first: the subnormals ``code * 2**-24`` (``high``: ``code * 2**-20``),
    one LOP3."""
    return T.bitwise_and(x, T.shift_left(T.uint32(0x000F000F), T.Cast("uint32", 4 * high)))


def _codes_integer_f16x2(dst, x, high: bool):
    """``dst`` = the 4-bit codes in bits 0-3 and 16-19 of ``x`` (``high``: 4-7 and 20-23) as an
    exact float16 integer pair, low half first (one LOP3 and one HSUB2/HFMA2)."""
    if high:
        biased = T.bitwise_or(T.bitwise_and(x, T.uint32(0x00F000F0)), T.uint32(_F16X2_1024))
        return T.ptx["fma.rn.f16x2"](dst, biased, T.uint32(_F16X2_SIXTEENTH), T.uint32(_F16X2_MINUS_64))
    biased = T.bitwise_or(T.bitwise_and(x, T.uint32(0x000F000F)), T.uint32(_F16X2_1024))
    return T.ptx["sub.f16x2"](dst, biased, T.uint32(_F16X2_1024))


def _v_chunk_slot(token, chunk):
    """16-byte slot of V's chunk ``chunk`` of page token ``token`` (P = 16) in a ring stage:
    chunk-major, tokens in the order 4 (token % 4) + token // 4, the slot's bit 2 flipped on odd
    chunks. A lane reads chunk ``D / 8 g ..`` of tokens 4t + r: for each r, the 8 chunks that
    16 lanes (one ld.shared.v2 phase; 32 lanes of one ld.shared at D = 64) read fall on 8
    distinct 16-byte bank slots, where the page's own row-major order puts them on 2."""
    return chunk * 16 + T.bitwise_xor(4 * (token % 4) + token // 4, 4 * (chunk % 2))


def _v_slot_chunk(slot):
    """(token, chunk) whose V chunk `_v_chunk_slot` puts in ``slot``: lanes copy consecutive
    slots, so their cp.async writes are conflict-free too, and 32 lanes' sources are whole
    32-byte sectors (chunks 2c and 2c + 1 of 16 tokens)."""
    chunk = slot // 16
    order = T.bitwise_xor(slot % 16, 4 * (chunk % 2))
    return 4 * (order % 4) + order // 4, chunk


def _ld_shared_words(dst: list, ptr):
    """One ld.shared of ``len(dst)`` (1, 2 or 4) consecutive 32-bit words at ``ptr`` into ``dst``."""
    return T.ptx[{1: "ld.shared.u32", 2: "ld.shared.v2.u32", 4: "ld.shared.v4.u32"}[len(dst)]](*dst, ptr)


def _decode_tensor_core_body(HQ: int, HKV: int, D: int, P: int):
    """The cuda decode over INT4 pages on fp16 tensor cores (`_uses_tensor_core_decode` shapes).

    Per page a warp runs ``S^T = K_codes . Q^T`` and ``O^T += V_codes^T . P'^T`` as
    ``mma.sync m16n8k16`` (float32 accumulate), the 16 tokens of the page on M (scores) or K
    (output), the query heads of the group on N: the codes are exact float16 operands (K's the
    subnormals ``code * 2**-24`` and ``* 2**-20`` by nibble, accumulated apart and scaled back in
    float32; V's the integers 0..15), so the only rounding the tensor cores add is that of
    ``P' = p * scale_v``, which is split
    into two float16 terms (hi + lo, about 22 bits) fed to two mmas (without GQA, to one mma as
    its columns 0 and 1: the other columns would hold no head). As in the CUDA-core
    kernel, ``score = (scale_k * (q . code) + zero_k * sum(q)) / sqrt(D)`` and the output is
    ``sum(p * scale_v * code) + sum(p * zero_v)``, then ``/ l``.

    Fragment layout (lane = 4 g + t): the contraction axes may be permuted freely, so each lane
    loads whole chunks. Scores: lane (g, t) holds bytes ``16 t ..`` (D = 128; ``D / 8 * t`` in
    general) of tokens g and g + 8 as the A operand; pair ``r`` of its chunk is the dims
    ``8 (r // 4) + r % 4 + {0, 4}`` of the chunk (one LOP3 picks both nibbles), a word's pairs
    (0, 2) going to the low-nibble MMA and (1, 3) to the high-nibble one, and q's B fragment is
    packed in the same order once. Output: lane (g, t) holds dims ``D / 8 * g ..``
    (8 bytes at D = 128) of tokens ``4 t .. 4 t + 3`` (one PRMT pairs two tokens' bytes); M row
    g of tile ``mt`` is its dim ``mt``, row g + 8 its dim ``D / 16 + mt``. The probabilities
    leave the score layout (tokens on rows) through a padded shared tile per warp into the
    output's B layout (tokens on K). Online softmax per page (max by XOR shuffles over the 8
    row lanes), l and the zero term kept per lane and reduced at the end; the warps' states
    merge in shared memory like the CUDA-core kernel's slots, the splits in its second kernel.

    Loads: each warp streams its pages through a ring of `_TC_RING` shared-memory stages
    (cp.async, a page's K and V codes and (scale, zero) rows per stage), so `_TC_RING` - 1 pages
    are in flight without holding registers, and reads its fragments from the stage. On the
    H200 the kernel is bound by its instructions, not by memory: a copy of it that only streams
    the pages ran at the copy rate (docs/bench/attention.md).
    """
    G = HQ // HKV
    threads = _TC_WARPS * _WARP
    KW = D // 32  # words of a lane's K chunk (a quarter of a token row)
    VW = D // 64  # words of a lane's V chunk (an eighth of a token row)
    PAIRS = 4 * KW  # float16 pairs of a K chunk; two per k16 step of the score mma
    MT = D // 16  # m16 tiles of the output (its rows are head dims)
    ROW_BYTES = D // 2
    ROW_CHUNKS = ROW_BYTES // 16  # 16-byte chunks of a token row of codes
    CHUNKS = P * ROW_CHUNKS  # 16-byte chunks of a page's K (or V) codes of one head
    SZ_CHUNKS = P * 4 // 16  # 16-byte chunks of a page's K (or V) (scale, zero) words
    # A ring stage: K codes row-major, V codes in `_v_chunk_slot` order, K's then V's (scale,
    # zero) words.
    STAGE_WORDS = 4 * (2 * CHUNKS + 2 * SZ_CHUNKS)
    RING_SIZE = _TC_WARPS * _TC_RING * STAGE_WORDS
    # Head columns of a lane's C fragments that hold a query head: without GQA only column 0 of
    # lanes t = 0 does, so the softmax and the output skip the lanes' second column.
    NCOL = 1 if G == 1 else 2
    # Whether the output MMA's columns are the group's heads, P' = hi + lo taking two MMAs;
    # without GQA (1 head) hi and lo are the columns 0 and 1 of one MMA instead, and the lanes
    # t = 0 add the two.
    HEAD_COLUMNS = G > 1
    PS_SIZE = _TC_WARPS * 8 * _TC_P_STRIDE
    sm_scale = float(np.float32(1 / math.sqrt(D)))
    merge_slots = _merge_slots_macro(G, HKV, D, _TC_WARPS, threads, direct=True)
    merge_splits = _merge_splits_macro(HQ, HKV, D, direct=True)

    @T.macro
    def copy_page(kv_rows, sz_rows, Indptr, Indices, b, hk, lane, v_from, pg, p1, ring, stage_at):
        # cp.async page pg's K and V codes and (scale, zero) rows into the ring stage at word
        # `stage_at` (nothing past p1), then commit the group: every step commits one, so
        # "all but the newest RING - 2 groups" is always "up to the page of this step". Lane l
        # copies K's chunks l, l + 32, ..., V's slots l, l + 32, ... (from the page bytes
        # ``v_from``), lanes 0 .. 7 the (scale, zero) chunks.
        if pg < p1:
            page = Indices[Indptr[b] + pg]
            for i in T.unroll(CHUNKS // _WARP):
                T.evaluate(T.ptx["cp.async.cg.shared.global"](
                    ring.ptr_to([stage_at + 4 * (lane + _WARP * i)]),
                    kv_rows.ptr_to([page, 0, hk, 16 * (lane + _WARP * i)]), 16))
                T.evaluate(T.ptx["cp.async.cg.shared.global"](
                    ring.ptr_to([stage_at + 4 * (CHUNKS + lane + _WARP * i)]),
                    kv_rows.ptr_to([page, 1, hk, v_from[i]]), 16))
            if lane < 2 * SZ_CHUNKS:
                T.evaluate(T.ptx["cp.async.cg.shared.global"](
                    ring.ptr_to([stage_at + 4 * (2 * CHUNKS + lane)]),
                    sz_rows.ptr_to([page, lane // SZ_CHUNKS, hk, 8 * (lane % SZ_CHUNKS)]), 16))
        T.evaluate(T.ptx["cp.async.commit_group"]())

    @T.macro
    def read_page(ring, stage_at, g, t, kw, vw, sz):
        # This lane's fragments of the page in the ring stage at word `stage_at`: K chunks of
        # tokens g, g + 8, V chunks of tokens 4t .. 4t + 3, (scale, zero) words of K and V for
        # tokens g and g + 8.
        for r in T.unroll(2):
            T.evaluate(_ld_shared_words([kw[r * KW + w] for w in range(KW)],
                                        ring.ptr_to([stage_at + (g + 8 * r) * (ROW_BYTES // 4) + t * KW])))
        for r in T.unroll(4):
            T.evaluate(_ld_shared_words([vw[r * VW + w] for w in range(VW)], ring.ptr_to([
                stage_at + 4 * (CHUNKS + _v_chunk_slot(4 * t + r, g * VW // 4)) + g * VW % 4])))
        for r in T.unroll(2):
            for kv in T.unroll(2):
                T.evaluate(T.ptx["ld.shared.u32"](sz[2 * kv + r], ring.ptr_to(
                    [stage_at + 4 * (2 * CHUNKS + SZ_CHUNKS * kv) + g + 8 * r])))

    @T.macro
    def page_step(pg, j1, g, t, warp, kw, vw, sz, qf, qsum, m, l, zacc, oacc, ka,
                  va, sacc, pacc, sc, pp, alpha, rowf, pf, pb, ps):
        # Scores of the page's 16 tokens (rows) for the group's heads (columns 2t, 2t + 1): the
        # low-nibble pairs and the high-nibble pairs in two accumulators (their codes are scaled
        # by 2**-24 and 2**-20), each word's pairs (0, 2) and (1, 3) in one k16 step.
        for r in T.unroll(2):
            for w in T.unroll(KW):
                for half in T.unroll(2):
                    for high in T.unroll(2):
                        ka[r * PAIRS + 4 * w + 2 * half + high] = _codes_subnormal_f16x2(T.shift_right(
                            kw[r * KW + w], T.uint32(8 * half)), high)
        for c in T.unroll(8):
            sacc[c] = T.float32(0)
        for w in T.unroll(KW):
            for high in T.unroll(2):
                T.evaluate(T.ptx[_MMA_F16](
                    sacc[4 * high], sacc[4 * high + 1], sacc[4 * high + 2], sacc[4 * high + 3],
                    ka[4 * w + high], ka[PAIRS + 4 * w + high], ka[4 * w + 2 + high],
                    ka[PAIRS + 4 * w + 2 + high], qf[4 * w + high], qf[4 * w + 2 + high],
                    sacc[4 * high], sacc[4 * high + 1], sacc[4 * high + 2], sacc[4 * high + 3]))
        for c in T.unroll(4):
            sacc[c] = sacc[c] * T.float32(_LOW_NIBBLE_SCALE) + sacc[4 + c] * T.float32(_HIGH_NIBBLE_SCALE)
        # Scale and zero of K and V for rows g and g + 8; zeros for rows past j1, whose stale
        # bits may be inf or NaN (then every term of such a row is 0, its score _NEG_BIG).
        for r in T.unroll(2):
            rowf[r] = _scale(sz, r)
            rowf[2 + r] = _zero(sz, r)
            rowf[4 + r] = _scale(sz, 2 + r)
            rowf[6 + r] = _zero(sz, 2 + r)
            for i in T.unroll(4):
                rowf[2 * i + r] = T.Select(pg * P + g + 8 * r < j1, rowf[2 * i + r], T.float32(0))
        # Score c = 2 r + e is row g + 8 r, head column 2 t + e (C fragment order).
        for r in T.unroll(2):
            for e in T.unroll(NCOL):
                sc[2 * r + e] = T.Select(pg * P + g + 8 * r < j1, (
                    sacc[2 * r + e] * rowf[r] + qsum[e] * rowf[2 + r]) * T.float32(sm_scale),
                    T.float32(_NEG_BIG))
        # Online softmax per head column: the page max over the 8 row lanes, then rescale.
        for e in T.unroll(NCOL):
            page_max: T.float32 = T.max(sc[e], sc[2 + e])
            for k in T.unroll(3):
                page_max = T.max(page_max, _shuffle_xor(page_max, 4 << k))
            m_new: T.float32 = T.max(m[e], page_max)
            alpha[e] = T.exp(m[e] - m_new)
            m[e] = m_new
            for r in T.unroll(2):
                pp[2 * r + e] = T.exp(sc[2 * r + e] - m[e])
            l[e] = l[e] * alpha[e] + pp[e] + pp[2 + e]
            zacc[e] = zacc[e] * alpha[e] + pp[e] * rowf[6] + pp[2 + e] * rowf[7]
        # P' = p * scale_v from the score layout into the output's B layout, through shared memory.
        for r in T.unroll(2):
            for e in T.unroll(NCOL):
                T.evaluate(T.ptx["st.shared.f32"](
                    ps.ptr_to([(warp * 8 + 2 * t + e) * _TC_P_STRIDE + g + 8 * r]),
                    pp[2 * r + e] * rowf[4 + r]))
        T.evaluate(T.call_extern("void", "__syncwarp"))
        T.evaluate(T.ptx["ld.shared.v4.f32"](pf[0], pf[1], pf[2], pf[3],
                                             ps.ptr_to([(warp * 8 + g * int(HEAD_COLUMNS)) * _TC_P_STRIDE + 4 * t])))
        T.evaluate(T.call_extern("void", "__syncwarp"))
        for h in T.unroll(2):
            # hi = float16(P'), lo = float16(P' - hi): tokens 4t + 2h (low half), 4t + 2h + 1.
            T.evaluate(T.ptx["cvt.rn.f16x2.f32"](pb[h], pf[2 * h + 1], pf[2 * h]))
            T.evaluate(T.ptx["cvt.rn.f16x2.f32"](
                pb[2 + h], pf[2 * h + 1] - T.Cast("float32", T.Cast("float16", pf[2 * h + 1])),
                pf[2 * h] - T.Cast("float32", T.Cast("float16", pf[2 * h]))))
        if not HEAD_COLUMNS:
            # The one head's hi in column 0 (lanes g = 0), lo in the other columns.
            for h in T.unroll(2):
                pb[h] = T.Select(g == 0, pb[h], pb[2 + h])
        # V codes of tokens (4t, 4t + 1) and (4t + 2, 4t + 3) paired per dim: PRMT puts one
        # token's bytes in the low halves and the other's in the high halves.
        for pair in T.unroll(2):
            for w in T.unroll(VW):
                for half in T.unroll(2):
                    both = _byte_perm(vw[2 * pair * VW + w], vw[(2 * pair + 1) * VW + w],
                                      0x5410 + half * (0x7632 - 0x5410))
                    base = pair * 8 * VW + 8 * w + 4 * half
                    for byte in T.unroll(2):
                        T.evaluate(_codes_integer_f16x2(va[base + 2 * byte], T.shift_right(
                            both, T.uint32(8 * byte)), False))
                        T.evaluate(_codes_integer_f16x2(va[base + 2 * byte + 1], T.shift_right(
                            both, T.uint32(8 * byte)), True))
        # The page's P'.V in a fresh accumulator, added to the running one with a rounded FFMA
        # (which also applies the rescale): the tensor cores' float32 accumulation truncates,
        # an error that would grow with the sequence if every page added into one accumulator.
        for mt in T.unroll(MT):
            for c in T.unroll(4):
                pacc[c] = T.float32(0)
            for part in T.unroll(1 + int(HEAD_COLUMNS)):
                T.evaluate(T.ptx[_MMA_F16](
                    pacc[0], pacc[1], pacc[2], pacc[3],
                    va[mt], va[MT + mt], va[8 * VW + mt], va[8 * VW + MT + mt],
                    pb[2 * part], pb[2 * part + 1], pacc[0], pacc[1], pacc[2], pacc[3]))
            for r in T.unroll(2):
                if HEAD_COLUMNS:
                    for e in T.unroll(2):
                        oacc[4 * mt + 2 * r + e] = oacc[4 * mt + 2 * r + e] * alpha[e] + pacc[2 * r + e]
                else:
                    oacc[4 * mt + 2 * r] = oacc[4 * mt + 2 * r] * alpha[0] + (pacc[2 * r] + pacc[2 * r + 1])

    @T.macro
    def body(Q, codes, scale_zero, Indptr, Indices, LastLen, Out, B):
        part_ml = T.decl_buffer((B, HQ, CUDA_DECODE_SPLITS, 2), "float32")
        part_acc = T.decl_buffer((B, HQ, CUDA_DECODE_SPLITS, D), "float32")
        with T.launch_thread("blockIdx.x", B * HKV * _decode_splits(B, HKV)) as task:
            tx = T.launch_thread("threadIdx.x", threads)
            b = task // (HKV * _decode_splits(B, HKV))
            hk = task // _decode_splits(B, HKV) % HKV
            split = task % _decode_splits(B, HKV)
            warp = tx // _WARP
            g = tx % _WARP // 4
            t = tx % 4
            # One allocation carved into the page rings, the probability tiles and the merge
            # buffers: as separate allocations TVM overlays them (it cannot see the asm accesses
            # to the rings and tiles), and a warp that finishes early would write its state over
            # a tile in use. Dynamic, because GQA's merge buffers take it past 48 KiB.
            attention_smem = T.alloc_buffer((RING_SIZE + PS_SIZE + 2 * _TC_WARPS * G + _TC_WARPS * G * D,),
                                            "float32", scope="shared.dyn")
            ring = T.decl_buffer((RING_SIZE,), "uint32", data=attention_smem.data, scope="shared.dyn")
            ps = T.decl_buffer((PS_SIZE,), "float32", data=attention_smem.data, elem_offset=RING_SIZE,
                               scope="shared.dyn")
            ms = T.decl_buffer((_TC_WARPS * G,), "float32", data=attention_smem.data,
                               elem_offset=RING_SIZE + PS_SIZE, scope="shared.dyn")
            ls = T.decl_buffer((_TC_WARPS * G,), "float32", data=attention_smem.data,
                               elem_offset=RING_SIZE + PS_SIZE + _TC_WARPS * G, scope="shared.dyn")
            accs = T.decl_buffer((_TC_WARPS * G, D), "float32", data=attention_smem.data,
                                 elem_offset=RING_SIZE + PS_SIZE + 2 * _TC_WARPS * G, scope="shared.dyn")
            qf = T.alloc_local((PAIRS,), "uint32")
            qsum = T.alloc_local((2,), "float32")
            m = T.alloc_local((2,), "float32")
            l = T.alloc_local((2,), "float32")
            zacc = T.alloc_local((2,), "float32")
            oacc = T.alloc_local((4 * MT,), "float32")
            ka = T.alloc_local((2 * PAIRS,), "uint32")
            va = T.alloc_local((16 * VW,), "uint32")
            sacc = T.alloc_local((8,), "float32")
            pacc = T.alloc_local((4,), "float32")
            sc = T.alloc_local((4,), "float32")
            pp = T.alloc_local((4,), "float32")
            alpha = T.alloc_local((2,), "float32")
            rowf = T.alloc_local((8,), "float32")
            pf = T.alloc_local((4,), "float32")
            pb = T.alloc_local((4,), "uint32")
            kw = T.alloc_local((2 * KW,), "uint32")
            vw = T.alloc_local((4 * VW,), "uint32")
            sz = T.alloc_local((4,), "uint32")
            num = Indptr[b + 1] - Indptr[b]
            per = (num + _decode_splits(B, HKV) - 1) // _decode_splits(B, HKV)
            p0 = split * per
            p1 = T.min(num, (split + 1) * per)
            j1 = T.min(p1 * P, (num - 1) * P + LastLen[b])
            # q of head g as the B fragment, pairs in the order of the K chunk pairs.
            q_part: T.float32 = T.float32(0)
            for r in T.unroll(PAIRS):
                qf[r] = T.uint32(0)
                if g < G:
                    d = t * (D // 4) + 8 * (r // 4) + r % 4
                    qf[r] = _pair(Q[b, hk * G + g, d], Q[b, hk * G + g, d + 4])
                    q_part = q_part + T.Cast("float32", Q[b, hk * G + g, d]) + T.Cast(
                        "float32", Q[b, hk * G + g, d + 4])
            q_part = q_part + _shuffle_xor(q_part, 1)
            q_part = q_part + _shuffle_xor(q_part, 2)
            for e in T.unroll(2):
                # sum(q) of head column 2t + e, from the lanes of row group 2t + e.
                qsum[e] = T.tvm_warp_shuffle(T.uint32(_FULL_MASK), q_part, (2 * t + e) * 4, _WARP, _WARP)
                m[e] = T.float32(_NEG_BIG)
                l[e] = T.float32(0)
                zacc[e] = T.float32(0)
            for i in T.unroll(4 * MT):
                oacc[i] = T.float32(0)
            # Warp w takes pages p0 + w, p0 + w + WARPS, ...; step k computes the page in ring
            # stage k % RING and starts the copy of the page RING - 1 steps ahead into the stage
            # step k - 1 read (every lane is past it: page_step has warp barriers).
            ring_at = warp * _TC_RING * STAGE_WORDS
            # A page of one head as rows of its K and V bytes (and (scale, zero) halves).
            kv_rows = _view(codes, (codes.shape[0], 2, HKV, P * ROW_BYTES), "uint8", codes.elem_offset)
            sz_rows = _view(scale_zero, (scale_zero.shape[0], 2, HKV, P * 2), "float16",
                            scale_zero.elem_offset)
            v_from = T.alloc_local((CHUNKS // _WARP,), "int32")
            for i in T.unroll(CHUNKS // _WARP):
                token, chunk = _v_slot_chunk(tx % _WARP + _WARP * i)
                v_from[i] = token * ROW_BYTES + 16 * chunk
            for k in T.unroll(_TC_RING - 1):
                copy_page(kv_rows, sz_rows, Indptr, Indices, b, hk, tx % _WARP, v_from, p0 + warp + k * _TC_WARPS,
                          p1, ring, ring_at + k * STAGE_WORDS)
            steps = T.max(p1 - p0 - warp + _TC_WARPS - 1, 0) // _TC_WARPS
            for k in range(steps):
                T.evaluate(T.ptx["cp.async.wait_group"](_TC_RING - 2))
                T.evaluate(T.call_extern("void", "__syncwarp"))
                read_page(ring, ring_at + k % _TC_RING * STAGE_WORDS, g, t, kw, vw, sz)
                page_step(p0 + warp + k * _TC_WARPS, j1, g, t, warp, kw, vw, sz, qf, qsum, m, l, zacc,
                          oacc, ka, va, sacc, pacc, sc, pp, alpha, rowf, pf, pb, ps)
                copy_page(kv_rows, sz_rows, Indptr, Indices, b, hk, tx % _WARP, v_from,
                          p0 + warp + (k + _TC_RING - 1) * _TC_WARPS, p1, ring,
                          ring_at + (k + _TC_RING - 1) % _TC_RING * STAGE_WORDS)
            # l and the zero term were summed per lane: reduce them over the 8 row lanes.
            for e in T.unroll(NCOL):
                for k in T.unroll(3):
                    l[e] = l[e] + _shuffle_xor(l[e], 4 << k)
                    zacc[e] = zacc[e] + _shuffle_xor(zacc[e], 4 << k)
            for e in T.unroll(NCOL):
                if 2 * t + e < G:
                    if g == 0:
                        ms[warp * G + 2 * t + e] = m[e]
                        ls[warp * G + 2 * t + e] = l[e]
                    for mt in T.unroll(MT):
                        for half in T.unroll(2):
                            accs[warp * G + 2 * t + e, D // 8 * g + MT * half + mt] = (
                                oacc[4 * mt + 2 * half + e] + zacc[e])
            T.tvm_storage_sync("shared")
            merge_slots(ms, ls, accs, tx, b, hk, split, part_ml, part_acc, Out, B)
        merge_splits(part_ml, part_acc, Out, B)

    return body


#: Query rows (query token, query head of the group) a cuda prefill block holds.
_PREFILL_ROWS = 64
#: Threads of a cuda prefill block.
_PREFILL_THREADS = 128
#: Rows a thread owns in the P.V step (its accumulator is these rows x D / (threads / (R / 4))).
_PV_ROWS = 4


def _prefill_cuda_body(kv_bits: int, HQ: int, HKV: int, D: int, P: int):
    """The cuda variant of `prefill` (Variants in the module docstring has the layout).

    A block takes a tile of TQ = R // G consecutive new tokens of one sequence and one KV head,
    so its R = TQ * G query rows share every page it reads. Per page: the block dequantizes K and
    V (16-byte loads, tokens past the tile's causal end zeroed so that stale page slots never
    reach the arithmetic) into shared memory; thread (row group, token t) scores its rows against
    token t, the P lanes of a row group reduce the page's max and sum by XOR shuffles (the online
    softmax of the cpu variant, per page), write the probabilities over the K slot; then thread
    (4 rows, D / 8 columns) adds P.V into its register accumulator.
    """
    G = HQ // HKV
    R, threads = _PREFILL_ROWS, _PREFILL_THREADS
    if P != 16:
        raise UserError(f"the cuda prefill kernel is built for 16-token pages, not {P}; use page_size=16")
    if G > R:
        raise UserError(f"a GQA group of {G} query heads is too large for the cuda prefill kernel")
    TQ = R // G
    RQ = R * P // threads  # rows a thread scores (against one token)
    DG = threads // (R // _PV_ROWS)  # column groups of the P.V step
    DT = D // DG  # columns a thread accumulates
    E = 128 // kv_bits  # elements of a 16-byte chunk
    CR = D // E  # chunks of a K or V row
    chunks = 2 * P * CR
    sm_scale = float(np.float32(1 / math.sqrt(D)))
    # K during the scores, then P [P, R] and the rows' corrections [R] (and finally l).
    kp_size = max(P * D, P * R + R)

    @T.macro
    def body(Q, QoIndptr, codes, scale_zero, Indptr, Indices, LastLen, Out, n, B):
        KVW = _word_view(codes)
        if kv_bits != 16:
            SZW = _word_view(scale_zero)
        # Tiles of all sequences in order; n / TQ + B bounds their number (one partial per sequence).
        with T.launch_thread("blockIdx.x", ((n + TQ - 1) // TQ + B) * HKV) as task:
            tx = T.launch_thread("threadIdx.x", threads)
            qs = T.alloc_shared((R, D), "float32")
            kp = T.alloc_shared((kp_size,), "float32")
            vs = T.alloc_shared((P, D), "float32")
            words = T.alloc_local((4,), "uint32")
            sz = T.alloc_local((1,), "uint32")
            q4 = T.alloc_local((4,), "float32")
            k4 = T.alloc_local((4,), "float32")
            p4 = T.alloc_local((4,), "float32")
            v4 = T.alloc_local((4,), "float32")
            score = T.alloc_local((RQ,), "float32")
            m = T.alloc_local((RQ,), "float32")
            l = T.alloc_local((RQ,), "float32")
            corr = T.alloc_local((RQ,), "float32")
            acc = T.alloc_local((_PV_ROWS * DT,), "float32")
            slot = task // HKV
            hk = task % HKV
            b: T.int32 = -1
            tile: T.int32 = 0
            first: T.int32 = 0
            for bb in range(B):
                tiles = (QoIndptr[bb + 1] - QoIndptr[bb] + TQ - 1) // TQ
                if b < 0 and slot < first + tiles:
                    b = bb
                    tile = slot - first
                first = first + tiles
            if b >= 0:
                q0 = QoIndptr[b] + tile * TQ
                count = T.min(TQ, QoIndptr[b + 1] - q0)
                # Query i of the tile sees tokens [0, base + i + 1); the tile, [0, base + count).
                base = ((Indptr[b + 1] - Indptr[b] - 1) * P + LastLen[b]
                        - (QoIndptr[b + 1] - QoIndptr[b]) + tile * TQ)
                t = tx % P
                rg = tx // P
                pr = tx // DG
                dg = tx % DG
                for i in range(R * D // threads):
                    r = (i * threads + tx) // D
                    qs[r, (i * threads + tx) % D] = T.if_then_else(
                        r < count * G, T.Cast("float32", Q[q0 + r // G, hk * G + r % G,
                                                           (i * threads + tx) % D]), T.float32(0))
                for i in T.unroll(RQ):
                    m[i] = T.float32(_NEG_BIG)
                    l[i] = T.float32(0)
                for i in T.unroll(_PV_ROWS * DT):
                    acc[i] = T.float32(0)
                for pi in range((base + count + P - 1) // P):
                    page = Indices[Indptr[b] + pi]
                    for c in range((chunks + threads - 1) // threads):
                        if c * threads + tx < chunks:
                            ci = c * threads + tx
                            which = ci // (P * CR)
                            tok = ci // CR % P
                            x = ci % CR
                            for w in T.vectorized(4):
                                words[w] = KVW[page, which, hk, tok, x * 4 + w]
                            if kv_bits != 16:
                                sz[0] = SZW[page, which, hk, tok, 0]
                            for e in T.unroll(E):
                                value = T.if_then_else(pi * P + tok < base + count,
                                                       _dequant(kv_bits, words, sz, e), T.float32(0))
                                if which == 0:
                                    kp[tok * D + x * E + e] = value
                                else:
                                    vs[tok, x * E + e] = value
                    T.tvm_storage_sync("shared")
                    for i in T.unroll(RQ):
                        score[i] = T.float32(0)
                    for d4 in range(D // 4):
                        for e in T.vectorized(4):
                            k4[e] = kp[t * D + d4 * 4 + e]
                        for i in T.unroll(RQ):
                            for e in T.vectorized(4):
                                q4[e] = qs[rg * RQ + i, d4 * 4 + e]
                            for e in T.unroll(4):
                                score[i] = score[i] + q4[e] * k4[e]
                    for i in T.unroll(RQ):
                        # Masked tokens score _NEG_BIG: e^(s - m) is then 0, and token 0 of
                        # page 0 is visible to every row, so m is finite from the first page on.
                        s = T.if_then_else(pi * P + t < base + (rg * RQ + i) // G + 1,
                                           score[i] * T.float32(sm_scale), T.float32(_NEG_BIG))
                        page_max: T.float32 = s
                        for k in T.unroll(int(math.log2(P))):
                            page_max = T.max(page_max, _shuffle_xor(page_max, P >> (k + 1)))
                        m_new: T.float32 = T.max(m[i], page_max)
                        p: T.float32 = T.exp(s - m_new)
                        page_sum: T.float32 = p
                        for k in T.unroll(int(math.log2(P))):
                            page_sum = page_sum + _shuffle_xor(page_sum, P >> (k + 1))
                        score[i] = p
                        corr[i] = T.exp(m[i] - m_new)
                        l[i] = l[i] * corr[i] + page_sum
                        m[i] = m_new
                    # P and the corrections reach the P.V threads through the K slot.
                    T.tvm_storage_sync("shared")
                    for i in T.unroll(RQ):
                        kp[t * R + rg * RQ + i] = score[i]
                        if t == 0:
                            kp[P * R + rg * RQ + i] = corr[i]
                    T.tvm_storage_sync("shared")
                    for i in T.unroll(_PV_ROWS):
                        for j in T.unroll(DT):
                            acc[i * DT + j] = acc[i * DT + j] * kp[P * R + pr * _PV_ROWS + i]
                    for tok in range(P):
                        for e in T.vectorized(4):
                            p4[e] = kp[tok * R + pr * _PV_ROWS + e]
                        for j4 in T.unroll(DT // 4):
                            for e in T.vectorized(4):
                                v4[e] = vs[tok, dg * DT + j4 * 4 + e]
                            for i in T.unroll(_PV_ROWS):
                                for e in T.unroll(4):
                                    acc[i * DT + j4 * 4 + e] = acc[i * DT + j4 * 4 + e] + p4[i] * v4[e]
                    T.tvm_storage_sync("shared")
                if t == 0:
                    for i in T.unroll(RQ):
                        kp[rg * RQ + i] = l[i]
                T.tvm_storage_sync("shared")
                for i in T.unroll(_PV_ROWS):
                    r = pr * _PV_ROWS + i
                    if r < count * G:
                        for j in T.unroll(DT):
                            Out[q0 + r // G, hk * G + r % G, dg * DT + j] = T.Cast(
                                "float16", _fdiv(acc[i * DT + j], kp[r]))

    return body


def _check_variant(variant: str):
    if variant not in VARIANTS:
        raise UserError(f"unknown kernel variant {variant!r}: choose from {', '.join(VARIANTS)}")
