"""Target presets: which GPU archs a package may be built for, and the TVM targets to build with.

TVM 0.27 takes targets as JSON-like dicts (``{"kind": "cuda", "arch": "sm_80"}``); the old CLI strings
("cuda -arch=sm_80") are rejected, so every target in atom-tvm is made here.
"""

from __future__ import annotations

import re

import tvm

from atom_tvm.errors import UserError

# Why these archs, in this order (lowest first):
# - sm_80, sm_86, sm_89 (A100; A10/RTX 30xx; L4/L40/RTX 40xx) run Atom's INT4 x INT4 matmuls on the
#   native `mma.m16n8k64 .s4` tensor-core instruction (one IMMA.16864.S4 in SASS).
# - sm_90 / sm_90a (H100/H200) have no native INT4 mma (ptxas emulates it with two INT8 IMMAs plus
#   ~180 bit operations), so Hopper takes the INT8 path; sm_90a additionally unlocks the
#   arch-specific Hopper instructions (wgmma, setmaxnreg) that code for plain sm_90 may not use.
# Older archs (sm_75 and below) lack the INT4 mma shapes we emit, so they are refused up front.
SUPPORTED_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90", "sm_90a")

# Target kinds a package can be built for. "llvm" is the CPU reference build.
SUPPORTED_KINDS = ("llvm", "cuda")


def _arch_order(arch: str) -> tuple[int, str]:
    """Sort key: sm_80 < sm_86 < sm_90 < sm_90a (number first, then the arch-specific suffix)."""
    match = re.fullmatch(r"sm_(\d+)([a-z]?)", arch)
    assert match, arch  # only called on archs already checked against SUPPORTED_ARCHS
    return int(match.group(1)), match.group(2)


def parse_archs(text: str) -> list[str]:
    """Parse a comma-separated arch list such as ``"sm_80, sm_89,sm_90a"``.

    Whitespace and empty items are ignored, duplicates are dropped and the user's order is kept
    (the order is the order of the -gencode flags, which does not change what gets built).
    An unknown arch, or an empty list, raises UserError naming the valid archs.
    """
    valid = ", ".join(SUPPORTED_ARCHS)
    archs: list[str] = []
    for item in text.split(","):
        arch = item.strip()
        if not arch:
            continue
        if arch not in SUPPORTED_ARCHS:
            raise UserError(f"unknown CUDA arch {arch!r}: choose from {valid}")
        if arch not in archs:
            archs.append(arch)
    if not archs:
        raise UserError(f"no CUDA arch given: choose one or more of {valid} (comma-separated)")
    return archs


def lowest_arch(archs: list[str]) -> str:
    """The oldest arch of ``archs``: code generated for it is valid on every arch in the list."""
    return min(archs, key=_arch_order)


def make_target(kind: str, archs: list[str]) -> tvm.target.Target:
    """The TVM target to compile a package for.

    ``kind="llvm"`` is the host CPU; ``archs`` is not used for it. ``kind="cuda"`` needs at least one
    arch from SUPPORTED_ARCHS. TVM's CUDA codegen writes one CUDA C source for all archs and only
    gates a few features on the target arch, so the target gets the *lowest* requested arch: the
    source is then valid for all of them, and nvcc turns it into SASS for each one (see
    ``atom_tvm.cuda_build.use_nvcc_fatbin``). The host side of a CUDA build (argument packing,
    kernel launches) is compiled by LLVM, hence the explicit llvm host.
    """
    if kind == "llvm":
        return tvm.target.Target({"kind": "llvm"})
    if kind == "cuda":
        if not archs:
            raise UserError(
                f"--target cuda needs at least one arch: choose from {', '.join(SUPPORTED_ARCHS)}"
            )
        for arch in archs:
            if arch not in SUPPORTED_ARCHS:
                raise UserError(
                    f"unknown CUDA arch {arch!r}: choose from {', '.join(SUPPORTED_ARCHS)}"
                )
        # The limits every supported arch has (48 KiB static shared memory per block without the
        # opt-in, 1024 threads, warps of 32); stated so TVM does not guess them with a warning.
        device = {"kind": "cuda", "arch": lowest_arch(archs), "max_shared_memory_per_block": 49152,
                  "max_threads_per_block": 1024, "thread_warp_size": 32}
        return tvm.target.Target(device, host={"kind": "llvm"})
    raise UserError(f"unknown target {kind!r}: choose from {', '.join(SUPPORTED_KINDS)}")


def kernel_variant(target: tvm.target.Target, family: str, cuda_variants: dict[str, str]) -> str:
    """The variant of a kernel family a target gets: ``cpu`` on llvm, on cuda the one mapped from
    the target's arch; anything else is a UserError naming what the family supports."""
    kind = target.kind.name
    if kind == "llvm":
        return "cpu"
    if kind == "cuda":
        arch = str(target.attrs.get("arch", ""))
        if arch in cuda_variants:
            return cuda_variants[arch]
        raise UserError(f"no {family} for CUDA arch {arch or '(none)'}; use one of {', '.join(cuda_variants)}")
    raise UserError(f"no {family} for target kind {kind!r}; use llvm or cuda")
