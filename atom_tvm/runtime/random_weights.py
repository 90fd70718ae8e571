"""Random stand-ins for a package's parameters, made on the GPU by torch, for timing library-only
packages (`bench/e2e.py`): a 7B or 13B model's real weights do not travel to the benchmark host.

Float matrices are N(0, 0.02); norm weights (1-D) are ones so activations keep their scale through
the layers; packed codes and masks (uint8, int8) are uniform over their integer range; int32
parameters are channel indices (reorder indices, o_proj's outlier channels) and must stay within
their channels (anything else reads out of bounds): a random permutation of their own length does,
since a reorder index has one entry per channel and o_proj's O outlier indices then name channels
below O of its K > O.
"""

from __future__ import annotations

from typing import Callable

from atom_tvm.errors import UserError


def random_param(shape: tuple[int, ...], dtype: str, device: str, gen):
    """A random torch tensor of ``shape`` and ``dtype`` on ``device`` ('cuda', 'cuda:1', 'cpu')."""
    import torch

    if dtype in ("float16", "bfloat16", "float32"):
        if len(shape) == 1:
            return torch.ones(shape, dtype=getattr(torch, dtype), device=device)
        return (torch.randn(shape, generator=gen, device=device) * 0.02).to(getattr(torch, dtype))
    if dtype in ("uint8", "int8"):
        info = torch.iinfo(getattr(torch, dtype))
        return torch.randint(info.min, info.max + 1, shape, generator=gen, device=device, dtype=getattr(torch, dtype))
    if dtype == "int32":
        perm = torch.randperm(shape[-1], generator=gen, device=device, dtype=torch.int32)
        return perm.expand(shape).contiguous()
    raise UserError(f"parameter dtype {dtype}: no random stand-in; extend atom_tvm/runtime/random_weights.py")


def param_maker(device: str, seed: int) -> Callable:
    """``make_param(name, shape, dtype)`` for `LoadedPackage`: a random tensor on ``device``, handed to
    TVM through DLPack (no copy)."""
    import torch
    import tvm_ffi

    gen = torch.Generator(device=device).manual_seed(seed)
    return lambda _name, shape, dtype: tvm_ffi.from_dlpack(random_param(shape, dtype, device, gen))
