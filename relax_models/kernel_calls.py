"""How the Relax models call our hand-written TIR kernels (`tir_kernels/`).

The kernels are finished TIR: explicit loops, and on CUDA explicit threads. Relax must call them as
they are, which takes three marks that TVM's own operators never need; the quantization schemes and
Atom's KV cache share them here.
"""

from __future__ import annotations

import functools
from typing import Callable

from tvm import s_tir, tirx
from tvm.relax.frontend.nn import Tensor, op
from tvm.target import Target


def kernel_variant(target: Target) -> str:
    """``cpu`` or ``cuda``: the variant of the kernel families with one CUDA variant for every arch
    (quantizers, KV attention; the GEMMs choose per arch with `deploy.targets.kernel_variant`)."""
    return "cpu" if target.kind.name == "llvm" else "cuda"


def opaque(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """A hand-written kernel as Relax must treat it: never fused with its neighbours (FuseOps would
    inline elementwise ops into it), never rescheduled by dlight (its CUDA variants bind threads).
    Its global symbol goes too: the kernels name themselves by variant, not by shape, so two shapes
    of one kernel would clash; the build names each after the GlobalVar it is added as."""
    func = func.with_attr({"op_pattern": 8, "tirx.is_scheduled": True})  # 8: kOpaque
    return _block_rooted(func.without_attr("global_symbol"))


def _block_rooted(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` with its body inside an empty root block, as TVMScript's schedulable functions have.

    Relax's RewriteDataflowReshape asks of every call_tir with one input whether the callee is a
    reshape, and that analysis (HasReshapePattern) aborts, instead of answering no, on a body that
    is not a block. The root block changes nothing in the lowered code.
    """
    if isinstance(func.body, s_tir.SBlockRealize):
        return func
    root = s_tir.SBlock(iter_vars=[], reads=[], writes=[], name_hint="root", body=func.body)
    return func.with_body(s_tir.SBlockRealize(iter_values=[], predicate=True, block=root))


def rows(x: Tensor) -> tuple[Tensor, tuple]:
    """``x [..., K]`` as the 2-D ``[M, K]`` the kernels take, and the leading shape to restore."""
    *lead, k = x.shape
    m = functools.reduce(lambda a, b: a * b, lead, 1)
    return op.reshape(x, (m, k)), tuple(lead)


def out_tensor(shape, dtype: str) -> Tensor:
    """A placeholder for a kernel's destination-passing output."""
    return Tensor.placeholder(tuple(shape), dtype)


def cached_kernel(make: Callable[..., tirx.PrimFunc]) -> Callable[..., tirx.PrimFunc]:
    """``make`` memoized on its arguments and marked `opaque`: every layer asks for the same few
    shapes, and generating TVMScript costs tens of milliseconds each time."""
    return functools.lru_cache(maxsize=None)(lambda *args: opaque(make(*args)))
