"""GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers") producing Atom's mixed INT4 / INT8-outlier weight layout.

GPTQ quantizes a weight one input channel at a time and spreads each channel's rounding error
over the channels not yet quantized, weighted by the inverse Hessian ``H = X^T X`` of the
layer's inputs, so that the layer output ``X W^T`` rather than ``W`` itself stays close.

Atom specifics: the weight's input channels are already reordered so the last ``n_outliers``
are outliers; those are quantized to INT8 with one scale per output row, the rest to INT4 in
groups. Scales are chosen when GPTQ reaches a group's first channel, from the weights as
already corrected by the earlier channels' errors. The result uses exactly the grid and the
rounding of `formats`, so ``gptq(...).dequantize()`` is representable by the kernels.

All arithmetic is float64 except the code rounding, which follows `formats` (float32). Work is
vectorised over output rows; Python loops run once per input channel, as in the paper.
"""

from __future__ import annotations

import numpy as np

from atom_tvm.errors import UserError
from atom_tvm.quantization.formats import (
    DEFAULT_OUTLIERS,
    AtomWeight,
    check_atom_split,
    int_range,
    pack_int4,
    round_to_grid,
    symmetric_scale,
)


def gptq(
    w: np.ndarray,
    hessian: np.ndarray,
    group_size: int,
    n_outliers: int = DEFAULT_OUTLIERS,
    clip: float = 1.0,
    damp: float = 0.01,
    block_size: int = 128,
) -> AtomWeight:
    """Quantize ``w [N, K]`` given ``hessian [K, K]``, both in the reordered channel order.

    ``hessian`` is ``sum over calibration tokens of x^T x``; any positive multiple gives the
    same result (up to rounding) because the damping, ``damp * mean(diag(H))``, scales with it.
    ``clip`` applies to the INT4 group scales only, as in `formats.quantize_atom_weight`.
    """
    if np.ndim(w) != 2:
        raise UserError(f"expected a weight matrix [N, K], got shape {np.shape(w)}")
    wt = np.array(w, np.float64).T.copy()  # [K, N]: each input channel is a contiguous row
    k, n = wt.shape
    check_atom_split(k, group_size, n_outliers)
    if block_size % group_size:
        raise UserError(f"GPTQ block size {block_size} is not a multiple of group {group_size}")
    h = np.array(hessian, np.float64)
    if h.shape != (k, k):
        raise UserError(f"Hessian shape {h.shape} does not match the weight's {k} input channels")
    if not np.isfinite(h).all():
        raise UserError("Hessian has NaN/inf entries; recollect the calibration statistics")

    # Channels that never saw a non-zero input carry no information: pin them to zero.
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    wt[dead] = 0.0
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    u = _inverse_cholesky_upper(h)

    codes = np.empty((k, n), np.int16)
    normal = k - n_outliers
    s4 = _quantize_span(wt, u, codes, 0, normal, 4, group_size, clip, block_size)
    if n_outliers:
        s8 = _quantize_span(wt, u, codes, normal, k, 8, n_outliers, 1.0, block_size)
    else:
        s8 = np.zeros((n, 1), np.float16)  # the layout keeps its [N, 1] outlier scale
    codes = np.ascontiguousarray(codes.T)
    return AtomWeight(
        q4=pack_int4(codes[:, :normal]),
        s4=s4,
        q8=codes[:, normal:].astype(np.int8),
        s8=s8,
        group_size=group_size,
        n_outliers=n_outliers,
    )


def _inverse_cholesky_upper(h: np.ndarray) -> np.ndarray:
    """Upper triangular ``U`` with ``H^-1 = U^T U`` (row ``i`` drives channel ``i``'s update).

    With ``J`` the order reversal and ``J H J = L L^T``, ``U = J L^-1 J``: one Cholesky and one
    triangular inverse instead of inverting ``H`` and factoring the inverse, which is several
    times slower for K = 11008.
    """
    try:
        low = np.linalg.cholesky(h[::-1, ::-1])
    except np.linalg.LinAlgError:
        raise UserError(
            "Hessian is not positive definite even after damping; raise the damping or "
            "collect more calibration tokens"
        ) from None
    return np.ascontiguousarray(_invert_lower(low)[::-1, ::-1])


def _invert_lower(low: np.ndarray) -> np.ndarray:
    """Inverse of a lower triangular matrix by halves, so nearly all work is matrix products."""
    n = low.shape[0]
    if n <= 128:
        return np.linalg.inv(low)
    m = n // 2
    top, bottom = _invert_lower(low[:m, :m]), _invert_lower(low[m:, m:])
    out = np.zeros_like(low)
    out[:m, :m], out[m:, m:] = top, bottom
    out[m:, :m] = -bottom @ (low[m:, :m] @ top)
    return out


def _quantize_span(
    wt: np.ndarray,
    u: np.ndarray,
    codes: np.ndarray,
    start: int,
    end: int,
    bits: int,
    group: int,
    clip: float,
    block_size: int,
) -> np.ndarray:
    """Run GPTQ over channels ``[start, end)`` of ``wt`` in place; return scales ``[N, groups]``.

    Blocks start at ``start`` so every group either lies inside one block or starts a block:
    either way its rows of ``wt`` hold all corrections so far when its scale is chosen.
    """
    qmin, qmax = int_range(bits)
    scales = []
    for b0 in range(start, end, block_size):
        b1 = min(b0 + block_size, end)
        ub = u[b0:b1, b0:b1]
        err = np.empty((b1 - b0, wt.shape[1]))
        for j, c in enumerate(range(b0, b1)):
            if (c - start) % group == 0:
                scale = symmetric_scale(np.abs(wt[c : c + group]).max(axis=0), bits, clip)
                scales.append(scale)
            codes[c] = round_to_grid(wt[c], scale, qmin, qmax)
            err[j] = (wt[c] - codes[c] * scale.astype(np.float64)) / ub[j, j]
            # Within the block, correct the remaining channels right away ...
            wt[c + 1 : b1] -= ub[j, j + 1 :, None] * err[j]
        # ... and the channels after it lazily, in one matrix product per block.
        wt[b1:] -= u[b0:b1, b1:].T @ err
    if not scales:
        return np.zeros((wt.shape[1], 0), np.float16)
    return np.stack(scales, axis=1)
