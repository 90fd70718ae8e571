"""Build CUDA libraries with compiled SASS on a machine that has no GPU (and no GPU driver).

How TVM 0.27 turns a CUDA target into device code, and where this module steps in:

1. TVM's codegen writes CUDA C and hands it to the global function ``ffi.Module.create.cuda``.
   That function lives in ``libtvm_runtime_cuda.so``, which links against the driver
   (``libcuda.so.1``). Without a driver the library does not load, the function is missing, and the
   exported package keeps CUDA *source*, compiled on the GPU host at load time (slow first start,
   needs NVRTC there, and we never learn at build time whether the kernels compile).
   ``enable_cuda_codegen()`` loads that library anyway, against a stand-in ``libcuda.so.1`` whose
   every entry point fails with CUDA_ERROR_NO_DEVICE: building never calls the driver.
2. With ``ffi.Module.create.cuda`` registered, the source is compiled at build time by the Python
   hook ``tvm_callback_cuda_compile(code)`` (TVM's default: NVRTC for one arch).
   ``use_nvcc_fatbin(archs)`` swaps in a hook that runs nvcc once and produces a fatbin with SASS
   for every requested arch plus PTX for the lowest one (so a newer GPU can JIT it).
3. ``list_cuda_codes(lib)`` reads an exported library back and says which SASS and PTX it carries,
   which is how the tests (and a release check) prove the package holds what was asked for.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import importlib.metadata
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import tvm
import tvm_ffi
from tvm.support import nvcc

from atom_tvm.errors import UserError
from atom_tvm.runtime.tvm_libs import load_runtime_cuda, runtime_dir

_CREATE_CUDA = "ffi.Module.create.cuda"
_COMPILE_HOOK = "tvm_callback_cuda_compile"
_CUDA_ERROR_NO_DEVICE = 100

# Set once the stand-in driver is loaded, so a second call can report how the runtime came up.
_standin_path: Path | None = None


# --------------------------------------------------------------------------------------------
# 1. Registering the CUDA runtime without a driver
# --------------------------------------------------------------------------------------------


def enable_cuda_codegen() -> str:
    """Make ``tvm.compile`` for a CUDA target compile its kernels at build time, GPU or not.

    Returns ``"driver"`` when TVM's CUDA runtime was already registered (a host with a real
    ``libcuda.so.1``: nothing is done) and ``"stand-in"`` when it was loaded against the build-only
    stand-in driver. Safe to call more than once.

    The effect is process-wide and cannot be undone: from then on every CUDA ``tvm.compile`` in
    this process compiles its kernels through ``tvm_callback_cuda_compile``. Wrap builds in
    ``use_nvcc_fatbin``; TVM's default hook needs NVRTC (pip package cuda-bindings).
    """
    global _standin_path
    if tvm_ffi.get_global_func(_CREATE_CUDA, allow_missing=True) is not None:
        return "stand-in" if _standin_path else "driver"

    runtime_cuda = runtime_dir() / "libtvm_runtime_cuda.so"
    try:
        # A driver may exist although `import tvm` did not pick it up; then no stand-in is needed.
        load_runtime_cuda()
    except OSError as err:
        # dlopen names the first library it cannot find; only a missing driver is ours to fix.
        if "libcuda.so.1" not in str(err):
            raise UserError(f"cannot load {runtime_cuda.name}: {err}") from err
        standin = _build_driver_standin(runtime_cuda)
        # RTLD_GLOBAL + soname libcuda.so.1: the dynamic loader then resolves the runtime's
        # NEEDED libcuda.so.1 (and cudart's own dlopen of it) to this already-loaded library.
        ctypes.CDLL(str(standin), mode=ctypes.RTLD_GLOBAL)
        try:
            load_runtime_cuda()
        except OSError as err2:
            raise UserError(f"cannot load {runtime_cuda.name}: {err2}") from err2
        _standin_path = standin

    if tvm_ffi.get_global_func(_CREATE_CUDA, allow_missing=True) is None:
        raise UserError(f"{runtime_cuda.name} loaded but did not register {_CREATE_CUDA}")
    return "stand-in" if _standin_path else "driver"


def _undefined_driver_symbols(lib: Path) -> list[str]:
    """Names of the driver API functions (``cuXxx``) that ``lib`` imports.

    Read from the ELF dynamic symbol table rather than hard-coded, so a TVM upgrade that calls one
    more driver function still gets a stand-in that loads. Runtime API imports (``cudaXxx``,
    satisfied by libcudart) do not match ``cu[A-Z]``.
    """
    data = lib.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise UserError(f"{lib} is not a 64-bit little-endian ELF library")
    # Elf64_Ehdr: e_shoff at 0x28, e_shentsize and e_shnum at 0x3A.
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    # Elf64_Shdr: name, type, flags, addr, offset, size, link, info, addralign, entsize.
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names: set[str] = set()
    for _, sh_type, _, _, offset, size, link, _, _, entsize in sections:
        if sh_type != 11:  # SHT_DYNSYM
            continue
        strtab_offset = sections[link][4]
        for sym in range(offset, offset + size, entsize):
            # Elf64_Sym: st_name, st_info, st_other, st_shndx, st_value, st_size.
            st_name, _, _, st_shndx, _, _ = struct.unpack_from("<IBBHQQ", data, sym)
            if st_shndx != 0:  # defined here, not imported
                continue
            end = data.index(b"\0", strtab_offset + st_name)
            name = data[strtab_offset + st_name : end].decode()
            if re.fullmatch(r"cu[A-Z]\w*", name):
                names.add(name)
    return sorted(names)


def _standin_source(symbols: list[str]) -> str:
    """C source of a libcuda.so.1 whose every function fails with CUDA_ERROR_NO_DEVICE.

    The x86-64/aarch64 calling conventions let a no-argument ``int f(void)`` stand in for any
    driver function: arguments are ignored and the int lands where a CUresult is read. The two
    error-to-string functions are real, because callers print the string they return.
    """
    lines = [
        "/* Build-only stand-in for libcuda.so.1, generated by atom_tvm.cuda_build.",
        " * Lets libtvm_runtime_cuda.so load on a host without a GPU driver; nothing works. */",
        'static const char kMessage[] = "CUDA_ERROR_NO_DEVICE (atom-tvm build-only libcuda stand-in)";',
    ]
    for name in symbols:
        if name in ("cuGetErrorName", "cuGetErrorString"):
            lines.append(f"int {name}(int error, const char **text) {{")
            lines.append("  (void)error;")
            lines.append("  if (text) *text = kMessage;")
            lines.append("  return 0;")
            lines.append("}")
        else:
            lines.append(f"int {name}(void) {{ return {_CUDA_ERROR_NO_DEVICE}; }}")
    return "\n".join(lines) + "\n"


def _build_driver_standin(runtime_cuda: Path) -> Path:
    """Compile the stand-in once per distinct symbol set; later builds reuse the cached library."""
    source = _standin_source(_undefined_driver_symbols(runtime_cuda))
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    cache_root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    out_dir = cache_root / "atom-tvm" / "libcuda-standin" / digest
    target = out_dir / "libcuda.so.1"
    if target.exists():
        return target

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise UserError("cc not found: a C compiler is needed to build for --target cuda without a GPU")
    out_dir.mkdir(parents=True, exist_ok=True)
    # Build under a private name and rename, so concurrent builds never load a half-written file.
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        c_file = Path(tmp) / "libcuda_standin.c"
        c_file.write_text(source)
        built = Path(tmp) / "libcuda.so.1"
        proc = subprocess.run(
            [compiler, "-shared", "-fPIC", "-O1", "-Wl,-soname,libcuda.so.1", "-o", str(built), str(c_file)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise UserError(f"building the libcuda stand-in failed: {proc.stderr.strip()}")
        os.replace(built, target)
    return target


# --------------------------------------------------------------------------------------------
# 2. Compiling the kernels with nvcc, one SASS per arch
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class NvccStats:
    """What the nvcc hook did while it was installed (for build logs)."""

    calls: int = 0
    seconds: float = 0.0


def nvcc_gencode_flags(archs: list[str], embed_ptx: bool = True) -> list[str]:
    """One ``-gencode`` per arch (SASS), plus PTX of the lowest arch so newer GPUs can JIT it.

    ``sm_90a`` becomes ``arch=compute_90a,code=sm_90a``: the arch-specific variant needs the
    arch-specific virtual architecture.
    """
    flags = []
    for arch in archs:
        num = arch[len("sm_") :]
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    if embed_ptx:
        low = _lowest(archs)[len("sm_") :]
        flags.append(f"-gencode=arch=compute_{low},code=compute_{low}")
    return flags


@contextlib.contextmanager
def use_nvcc_fatbin(archs: list[str], embed_ptx: bool = True) -> Iterator[NvccStats]:
    """Within the block, CUDA kernels are compiled by nvcc into a fatbin for all of ``archs``.

    Overrides the global ``tvm_callback_cuda_compile`` and puts the previous hook back on exit.
    Needs ``enable_cuda_codegen()`` (otherwise TVM never calls the hook and keeps source).
    Yields an NvccStats that counts nvcc runs and their wall time.
    """
    if not archs:
        raise UserError("no CUDA arch given for the nvcc build")
    for arch in archs:
        if not re.fullmatch(r"sm_\d+a?", arch):
            raise UserError(f"not a CUDA arch: {arch!r} (expected e.g. sm_80 or sm_90a)")
    _check_nvcc()

    flags = nvcc_gencode_flags(list(archs), embed_ptx)
    # compile_cuda reads Target.current() for a compute version even when given explicit flags,
    # and TVM calls the hook with no target in scope; the lowest arch is the honest answer.
    scope_target = tvm.target.Target({"kind": "cuda", "arch": _lowest(list(archs))})
    stats = NvccStats()

    def compile_hook(code: str, *_unused) -> bytes:
        start = time.perf_counter()
        with scope_target:
            fatbin = nvcc.compile_cuda(code, target_format="fatbin", arch=flags, compiler="nvcc")
        stats.calls += 1
        stats.seconds += time.perf_counter() - start
        return bytes(fatbin)

    previous = tvm_ffi.get_global_func(_COMPILE_HOOK, allow_missing=True)
    tvm_ffi.register_global_func(_COMPILE_HOOK, compile_hook, override=True)
    try:
        yield stats
    finally:
        if previous is None:
            tvm_ffi.remove_global_func(_COMPILE_HOOK)
        else:
            tvm_ffi.register_global_func(_COMPILE_HOOK, previous, override=True)


def compile_cuda(func, archs) -> tvm.runtime.Executable:
    """``tvm.compile`` of a PrimFunc (or IRModule) for CUDA ``archs``: the lowest arch's target,
    SASS for every arch in one nvcc fatbin. Works without a GPU; call ``export_library`` on it."""
    from deploy.targets import make_target

    enable_cuda_codegen()
    with use_nvcc_fatbin(list(archs)):
        return tvm.compile(func, make_target("cuda", list(archs)))


def _check_nvcc() -> None:
    """Fail before compiling anything if nvcc is missing or too old for sm_90a."""
    message = "nvcc not found: install the CUDA toolkit (nvcc >= 12.x) to build --target cuda"
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise UserError(message)
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release (\d+)\.(\d+)", out)
    if match is None:
        raise UserError(f"{nvcc} --version gave no release number; {message}")
    if int(match.group(1)) < 12:
        raise UserError(f"{nvcc} is CUDA {match.group(1)}.{match.group(2)}; {message}")


def _arch_key(arch: str) -> tuple[int, str]:
    """sm_80 < sm_86 < sm_90 < sm_90a."""
    match = re.fullmatch(r"sm_(\d+)([a-z]?)", arch)
    return (int(match.group(1)), match.group(2)) if match else (1 << 30, arch)


def _lowest(archs: list[str]) -> str:
    return min(archs, key=_arch_key)


# --------------------------------------------------------------------------------------------
# 3. Reading back what an exported library carries
# --------------------------------------------------------------------------------------------

_FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)
# Outer header: magic u32, version u16, header size u16, size of the entries that follow u64.
_FATBIN_HEADER = struct.Struct("<IHHQ")
# Each entry starts with: kind u16 (1 PTX, 2 ELF), version u16, header size u32, payload size u64.
_FATBIN_ENTRY = struct.Struct("<HHIQ")


def find_fatbins(data: bytes) -> list[bytes]:
    """Every CUDA fatbin embedded in ``data`` (an exported .so, or a raw .fatbin file).

    TVM stores the fatbin verbatim in the library's serialized module blob (in .rodata). The
    whole file is scanned rather than just .rodata; a candidate counts only when its header is
    sane and its entries add up exactly to the size the header declares, so stray 0xBA55ED50
    bytes elsewhere are not mistaken for a fatbin.
    """
    found = []
    pos = data.find(_FATBIN_MAGIC)
    while pos >= 0:
        length = _fatbin_length(data, pos)
        if length:
            found.append(data[pos : pos + length])
            pos = data.find(_FATBIN_MAGIC, pos + length)
        else:
            pos = data.find(_FATBIN_MAGIC, pos + 1)
    return found


def _fatbin_length(data: bytes, pos: int) -> int:
    """Total length of the fatbin starting at ``pos``, or 0 if it is not a well-formed one."""
    if pos + _FATBIN_HEADER.size > len(data):
        return 0
    _, version, header_size, entries_size = _FATBIN_HEADER.unpack_from(data, pos)
    end = pos + header_size + entries_size
    if version != 1 or header_size < _FATBIN_HEADER.size or entries_size == 0 or end > len(data):
        return 0
    entry = pos + header_size
    while entry < end:
        if entry + _FATBIN_ENTRY.size > end:
            return 0
        kind, _, entry_header, payload = _FATBIN_ENTRY.unpack_from(data, entry)
        if kind not in (1, 2) or entry_header < _FATBIN_ENTRY.size:
            return 0
        entry += entry_header + payload
    return end - pos if entry == end else 0


def find_cuobjdump() -> str | None:
    """cuobjdump from PATH, else from the pip package nvidia-cuda-cuobjdump (not put on PATH)."""
    on_path = shutil.which("cuobjdump")
    if on_path:
        return on_path
    try:
        files = importlib.metadata.files("nvidia-cuda-cuobjdump") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == "cuobjdump" and file.parent.name == "bin":
            path = Path(file.locate())
            if path.is_file() and os.access(path, os.X_OK):
                return str(path)
    return None


def list_cuda_codes(lib_path: str | os.PathLike) -> dict[str, list[str]]:
    """The GPU codes in an exported library: ``{"sass": ["sm_80", ...], "ptx": ["sm_80"]}``.

    Lists are sorted oldest arch first and hold each arch once, over all fatbins in the library.
    Raises UserError when cuobjdump is missing, or when the library carries CUDA source (TVM's
    runtime was not registered at build time, see enable_cuda_codegen) or no CUDA code at all.
    """
    lib_path = Path(lib_path)
    data = lib_path.read_bytes()
    fatbins = find_fatbins(data)
    if not fatbins:
        if b"__global__" in data:
            raise UserError(
                f"{lib_path.name} holds CUDA source, not a fatbin: its kernels were not compiled at "
                "build time (call atom_tvm.cuda_build.enable_cuda_codegen() before tvm.compile)"
            )
        raise UserError(f"{lib_path.name} holds no CUDA code (no fatbin, no CUDA source)")

    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        raise UserError("cuobjdump not found: pip install nvidia-cuda-cuobjdump")

    codes: dict[str, set[str]] = {"sass": set(), "ptx": set()}
    with tempfile.TemporaryDirectory() as tmp:
        for index, fatbin in enumerate(fatbins):
            # A neutral file name: cuobjdump names its listing entries after the input file.
            blob = Path(tmp) / f"kernels{index}.fatbin"
            blob.write_bytes(fatbin)
            proc = subprocess.run(
                [cuobjdump, "--list-elf", "--list-ptx", str(blob)], capture_output=True, text=True
            )
            if proc.returncode != 0:
                raise RuntimeError(f"cuobjdump failed on fatbin {index} of {lib_path}: {proc.stderr.strip()}")
            for kind, arch in _parse_cuobjdump_listing(proc.stdout):
                codes[kind].add(arch)
    return {kind: sorted(archs, key=_arch_key) for kind, archs in codes.items()}


def _parse_cuobjdump_listing(text: str) -> Iterator[tuple[str, str]]:
    """Yield ("sass"|"ptx", arch) from lines like ``ELF file    1: kernels0.1.sm_90a.cubin``."""
    for line in text.splitlines():
        match = re.match(r"\s*(ELF|PTX) file\s+\d+:\s*(\S+)", line)
        if not match:
            continue
        arch = re.search(r"(?:sm|compute)_(\d+[a-z]?)", match.group(2))
        if arch is None:
            raise RuntimeError(f"cannot tell the arch of cuobjdump entry {line.strip()!r}")
        yield ("sass" if match.group(1) == "ELF" else "ptx"), f"sm_{arch.group(1)}"
