"""Atom's quantized number formats and the exact bytes the W4A4 kernels read.

Every function here is the reference the GPU kernels must reproduce bit for bit, so each
convention is fixed once, in this docstring, and nowhere else.

Conventions
-----------
* **Arithmetic.** Inputs are cast to float32 and all arithmetic is float32, as in the kernels.
* **Symmetric integer codes** (weights, activations). ``bits`` is 4 or 8; codes are clamped to
  the full two's-complement range ``[-2^(bits-1), 2^(bits-1)-1]`` (INT4 ``[-8, 7]``, INT8
  ``[-128, 127]``) while the scale maps the group's absmax to ``qmax = 2^(bits-1)-1``. With
  ``clip = 1`` no code falls below ``-qmax``; with ``clip < 1`` the clipped negative tail gets
  the extra ``-2^(bits-1)`` level, as in Atom's reference quantizer.
* **Scales.** ``scale = float16(absmax * float32(clip / qmax))``: absmax of the group in float32
  times a float32 constant, then rounded to float16 (round to nearest even). Codes are computed
  with that float16 scale, so ``q * scale`` is exactly what a kernel dequantizes.
* **Codes.** ``q = clamp(rint(x * r), qmin, qmax)`` with ``r = 1 / float32(scale)`` in float32,
  and ``r = 0`` where ``scale == 0`` (an all-zero group gives codes 0, never NaN or inf).
  ``rint`` rounds half to even (CUDA ``__float2int_rn`` / PTX ``cvt.rni``); a kernel must
  multiply by the reciprocal, not divide, to land on the same side of every tie.
* **Dequantization.** ``float32(q) * float32(scale)``.
* **INT4 packing.** Two codes per byte along the last axis: element ``2j`` in the low nibble,
  element ``2j+1`` in the high nibble, each as its 4-bit two's complement (KV codes unsigned).
  This is the operand order of PTX ``mma`` with ``.s4``/``.u4`` types.
* **KV cache** (asymmetric, per token per head). ``zero = float16(min)`` is a float offset, not
  an integer zero point: ``x ≈ q * scale + zero`` with ``q`` in ``[0, 2^bits - 1]``,
  ``scale = float16(max(max - float32(zero), 0) * float32(1 / qmax))`` and
  ``q = clamp(rint((x - zero) * r), 0, qmax)``, ``r`` the safe reciprocal as above. A row of
  equal values gets ``scale`` 0 (or a tiny one) and dequantizes to itself up to float16
  rounding of ``zero``.

Atom mixed-precision layout (row-major, C-contiguous)
-----------------------------------------------------
A matrix with ``K`` input channels, reordered so its last ``O = n_outliers`` channels are the
outliers, with INT4 group size ``G``. Rows are ``N`` output channels for a weight and ``M``
tokens for an activation (the runtime kernels compute the activation form on the fly).

======  =======  ===============  ============================================================
field   dtype    shape            contents
======  =======  ===============  ============================================================
q4      uint8    [rows, (K-O)/2]  INT4 codes of channels ``0 .. K-O-1``, packed as above
s4      float16  [rows, (K-O)/G]  scale of group ``g`` = channels ``[g*G, (g+1)*G)``
q8      int8     [rows, O]        INT8 codes of outlier channels ``K-O .. K-1``
s8      float16  [rows, 1]        one scale per row for the whole outlier block (0 if O = 0)
======  =======  ===============  ============================================================

``G`` is 64 or 128 and ``K - O`` must be a multiple of ``G``; ``O`` may be 0 or ``K``. The INT4
part uses the caller's ``clip``; the INT8 outliers never clip (they are the large values).
The GEMM then is ``y[m, n] = sum_g sx4[m,g] sw4[n,g] sum_{k in g} qx4 qw4
+ sx8[m] sw8[n] sum_{k >= K-O} qx8 qw8``, each inner sum an exact int32 accumulation.

**Masked outliers** (o_proj's input by default, `atom_tvm.quantization.reorder`): an activation
of ``K`` channels in its own order, whose outlier channels ``outliers`` (int32 [O]) are not
moved to the end but *copied*: the layout above of the ``K + O`` channels
``[x * keep, x[:, outliers]]``, ``keep`` zero on the outlier channels and one elsewhere. The INT4
part spans all K channels in order (an outlier channel codes 0 and stays out of its group's
absmax), the INT8 block holds the outliers; the weight is expanded the same way,
``[W * keep, W[:, outliers]]``, so the product is unchanged. A kernel reads which channels
are outliers from ``outlier_mask`` (uint8 [K/8]): bit ``e`` of byte ``c`` is set iff channel
``8c + e`` is an outlier.

KV cache codes are ``uint8 [..., head_dim]`` for 8 bits and ``uint8 [..., head_dim/2]`` for
4 bits, with ``scale`` and ``zero`` both ``float16 [..., 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from atom_tvm.errors import UserError

#: INT4 group sizes the W4A4 kernels are built for.
GROUP_SIZES = (64, 128)
#: Outlier channels kept in INT8, as in the paper.
DEFAULT_OUTLIERS = 128
#: The paper's fixed clipping ratios (searched per tensor by `search_clip` instead, if wanted).
WEIGHT_CLIP = 0.85
ACTIVATION_CLIP = 0.9
#: The ratios `search_clip` tries by default.
CLIP_CANDIDATES = tuple(np.linspace(0.7, 1.0, 13))


def int_range(bits: int) -> tuple[int, int]:
    """Two's-complement code range ``(qmin, qmax)`` of a signed ``bits``-bit integer."""
    if bits not in (4, 8):
        raise UserError(f"{bits}-bit integers are not supported; use 4 or 8 bits")
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def symmetric_scale(absmax: np.ndarray, bits: int, clip: float = 1.0) -> np.ndarray:
    """float16 scales mapping ``clip * absmax`` to the largest positive code."""
    if not 0.0 < clip <= 1.0:
        raise UserError(f"clip ratio {clip} is outside (0, 1]; use e.g. {WEIGHT_CLIP}")
    qmax = int_range(bits)[1]
    return _to_float16(np.asarray(absmax, np.float32) * np.float32(clip / qmax), "scale")


def round_to_grid(x: np.ndarray, scale: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """Codes ``clamp(rint(x * (1 / scale)), qmin, qmax)`` with a safe float32 reciprocal.

    ``scale`` broadcasts against ``x``; a zero scale yields code 0. int16 holds both the
    signed and the unsigned (KV) code ranges; callers narrow it.
    """
    scale32 = np.asarray(scale, np.float32)
    inv = np.zeros(scale32.shape, np.float32)
    np.divide(np.float32(1), scale32, out=inv, where=scale32 != 0)
    q = np.rint(np.asarray(x, np.float32) * inv)
    return np.clip(q, qmin, qmax).astype(np.int16)


def quantize_sym(
    x: np.ndarray, bits: int, group_size: int, clip: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric quantization in groups of ``group_size`` along the last axis.

    Returns int8 codes shaped like ``x`` and float16 scales ``[..., K / group_size]``.
    """
    x = np.asarray(x, np.float32)
    k = x.shape[-1]
    if group_size <= 0 or k % group_size:
        raise UserError(f"last axis {k} is not a multiple of group size {group_size}")
    groups = x.reshape(*x.shape[:-1], k // group_size, group_size)
    scale = symmetric_scale(np.abs(groups).max(axis=-1), bits, clip)
    q = round_to_grid(groups, scale[..., None], *int_range(bits))
    return q.astype(np.int8).reshape(x.shape), scale


def dequantize_sym(q: np.ndarray, scale: np.ndarray, group_size: int) -> np.ndarray:
    """float32 values ``q * scale`` of `quantize_sym`'s output."""
    groups = q.reshape(*q.shape[:-1], q.shape[-1] // group_size, group_size)
    deq = groups.astype(np.float32) * scale.astype(np.float32)[..., None]
    return deq.reshape(q.shape)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Pack signed INT4 codes in ``[-8, 7]`` two per byte (even index in the low nibble)."""
    q = np.asarray(q)
    if not np.issubdtype(q.dtype, np.integer):
        raise UserError(f"INT4 codes must be integers, got {q.dtype}")
    if q.size and (q.min() < -8 or q.max() > 7):
        raise UserError(f"INT4 codes must lie in [-8, 7], got [{q.min()}, {q.max()}]")
    return _pack_nibbles(q.astype(np.uint8) & 0xF)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """Inverse of `pack_int4`: sign-extended int8 codes, twice as many along the last axis."""
    nibbles = _unpack_nibbles(packed).astype(np.int8)
    return np.where(nibbles > 7, nibbles - 16, nibbles).astype(np.int8)


def _pack_nibbles(u: np.ndarray) -> np.ndarray:
    """Pack values in ``[0, 15]`` two per byte along the last axis, low nibble first."""
    if u.shape[-1] % 2:
        raise UserError(f"cannot pack an odd number ({u.shape[-1]}) of 4-bit codes per row")
    return u[..., 0::2] | (u[..., 1::2] << 4)


def _unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    if packed.dtype != np.uint8:
        raise UserError(f"packed 4-bit codes must be uint8, got {packed.dtype}")
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), np.uint8)
    out[..., 0::2] = packed & 0xF
    out[..., 1::2] = packed >> 4
    return out


def _to_float16(a: np.ndarray, what: str) -> np.ndarray:
    """Round to float16, refusing results that are not finite (overflow is reported, not warned)."""
    with np.errstate(over="ignore"):
        a = np.asarray(a).astype(np.float16)
    if not np.isfinite(a).all():
        raise UserError(f"{what} is not finite in float16: the input has NaN/inf or |x| > 65504")
    return a


# ---------------------------------------------------------------------------------------------
# Atom's mixed INT4 / INT8-outlier layout
# ---------------------------------------------------------------------------------------------


def check_atom_split(k: int, group_size: int, n_outliers: int) -> None:
    """Refuse a (K, G, O) combination the kernels cannot run, naming a setting that works."""
    if group_size not in GROUP_SIZES:
        raise UserError(f"group size {group_size} is not supported; use --group-size 64 or 128")
    if not 0 <= n_outliers <= k:
        raise UserError(
            f"{n_outliers} outlier channels do not fit hidden size {k}; "
            f"use --n-outliers between 0 and {k}"
        )
    normal = k - n_outliers
    if normal % group_size:
        working = [g for g in GROUP_SIZES if normal % g == 0]
        fix = (
            f"--group-size {working[0]}"
            if working
            else f"--n-outliers {n_outliers + normal % group_size}"
        )
        raise UserError(
            f"hidden size {k} - {n_outliers} outliers = {normal} is not a multiple of "
            f"group size {group_size}; use {fix}"
        )


@dataclass
class AtomTensor:
    """A matrix in Atom's mixed layout; see the module docstring for the exact table."""

    q4: np.ndarray
    s4: np.ndarray
    q8: np.ndarray
    s8: np.ndarray
    group_size: int
    n_outliers: int

    def dequantize(self) -> np.ndarray:
        """float32 ``[rows, K]`` values, normal channels first, outliers last."""
        normal = dequantize_sym(unpack_int4(self.q4), self.s4, self.group_size)
        outliers = self.q8.astype(np.float32) * self.s8.astype(np.float32)
        return np.concatenate([normal, outliers], axis=-1)


class AtomWeight(AtomTensor):
    """A linear layer's weight ``[N, K]``: one row per output channel."""


class AtomActivation(AtomTensor):
    """An activation ``[M, K]``: one row per token, scales per token."""


def quantize_atom_weight(
    w: np.ndarray, group_size: int, n_outliers: int = DEFAULT_OUTLIERS, clip: float = 1.0
) -> AtomWeight:
    """Round-to-nearest quantization of a reordered weight ``[N, K]`` into Atom's layout."""
    return AtomWeight(*_quantize_atom(w, group_size, n_outliers, clip), group_size, n_outliers)


def quantize_atom_activation(
    x: np.ndarray, group_size: int, n_outliers: int = DEFAULT_OUTLIERS, clip: float = 1.0
) -> AtomActivation:
    """Per-token quantization of a reordered activation ``[M, K]`` into Atom's layout."""
    parts = _quantize_atom(x, group_size, n_outliers, clip)
    return AtomActivation(*parts, group_size, n_outliers)


def _quantize_atom(x: np.ndarray, group_size: int, n_outliers: int, clip: float):
    x = np.asarray(x, np.float32)
    if x.ndim != 2:
        raise UserError(f"expected a 2-D matrix [rows, K], got shape {x.shape}")
    rows, k = x.shape
    check_atom_split(k, group_size, n_outliers)
    q4, s4 = quantize_sym(x[:, : k - n_outliers], 4, group_size, clip)
    if n_outliers:
        q8, s8 = quantize_sym(x[:, k - n_outliers :], 8, n_outliers)
    else:
        q8, s8 = np.zeros((rows, 0), np.int8), np.zeros((rows, 1), np.float16)
    return pack_int4(q4), s4, q8, s8


def masked_outliers(x: np.ndarray, outliers: np.ndarray) -> np.ndarray:
    """``[x * keep, x[:, outliers]]``: the ``K + O`` channels of the masked-outlier layout
    (module docstring) of ``x [rows, K]``, float32."""
    x = np.asarray(x, np.float32)
    outliers = np.asarray(outliers)
    masked = x.copy()
    masked[:, outliers] = 0.0
    return np.concatenate([masked, x[:, outliers]], axis=1)


def outlier_mask(outliers: np.ndarray, k: int) -> np.ndarray:
    """uint8 [K/8]: bit ``e`` of byte ``c`` set iff channel ``8c + e`` is in ``outliers``."""
    if k % 8:
        raise UserError(f"channel count {k} is not a multiple of 8 (one mask byte per 8 channels)")
    bits = np.zeros(k, bool)
    bits[np.asarray(outliers)] = True
    return np.packbits(bits.reshape(-1, 8), axis=1, bitorder="little")[:, 0]


# ---------------------------------------------------------------------------------------------
# Asymmetric KV cache
# ---------------------------------------------------------------------------------------------


def quantize_kv_asym(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric per-row quantization of ``x [..., head_dim]`` for the KV cache.

    Returns ``(q, scale, zero)``: uint8 codes (packed two per byte for 4 bits) and float16
    ``scale``, ``zero`` of shape ``[..., 1]`` with ``x ≈ q * scale + zero``.
    """
    if bits not in (4, 8):
        raise UserError(f"{bits}-bit KV cache is not supported; use 4 or 8 bits")
    x = np.asarray(x, np.float32)
    qmax = (1 << bits) - 1
    zero = _to_float16(x.min(axis=-1, keepdims=True), "KV zero")
    span = np.maximum(x.max(axis=-1, keepdims=True) - zero.astype(np.float32), 0)
    scale = _to_float16(span * np.float32(1 / qmax), "KV scale")
    q = round_to_grid(x - zero.astype(np.float32), scale, 0, qmax).astype(np.uint8)
    return (_pack_nibbles(q) if bits == 4 else q), scale, zero


def dequantize_kv_asym(
    q: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int
) -> np.ndarray:
    """float32 ``q * scale + zero`` of `quantize_kv_asym`'s output."""
    codes = _unpack_nibbles(q) if bits == 4 else q
    return codes.astype(np.float32) * scale.astype(np.float32) + zero.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Clipping
# ---------------------------------------------------------------------------------------------


def search_clip(
    w: np.ndarray, group_size: int, bits: int, candidates: Sequence[float] = CLIP_CANDIDATES
) -> float:
    """The per-tensor clip ratio among ``candidates`` with the least dequantization MSE."""
    w = np.asarray(w, np.float32)

    def mse(clip: float) -> float:
        deq = dequantize_sym(*quantize_sym(w, bits, group_size, clip), group_size)
        return float(np.mean((deq - w) ** 2))

    return float(min(candidates, key=mse))
