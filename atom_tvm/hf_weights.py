"""Read a Hugging Face Llama checkpoint into the parameter names of `relax_models.llama`.

The Relax model fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj` (one GEMM each), so this
is where the checkpoint's separate matrices are concatenated. Safetensors (single file or sharded
with an index) and PyTorch `.bin` checkpoints are read; `.bin` needs torch.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from atom_tvm.errors import UserError

_FUSED = {
    "self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}
_LAYER = re.compile(r"^(model\.layers\.\d+\.)(.+)$")
#: A parameter of the compiled model: (name, shape, dtype).
ParamSpec = tuple[str, tuple[int, ...], str]
#: A float weight ``[N, K]`` -> the arrays that replace it in a quantized Linear, by field name.
QuantizeWeight = Callable[[np.ndarray], dict[str, np.ndarray]]


class CheckpointReader:
    """Lazy access to the tensors of a checkpoint directory, by Hugging Face name."""

    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        self._where: dict[str, Path] = {}
        self._open: dict[Path, Callable[[str], np.ndarray]] = {}
        st_files = sorted(self.model_dir.glob("*.safetensors"))
        bin_files = sorted(self.model_dir.glob("pytorch_model*.bin"))
        if st_files:
            self._index(st_files, self._safetensors_names)
        elif bin_files:
            self._index(bin_files, self._torch_names)
        else:
            raise UserError(f"{self.model_dir}: no *.safetensors or pytorch_model*.bin weights found")

    def _index(self, files: list[Path], names: Callable[[Path], list[str]]) -> None:
        for f in files:
            for name in names(f):
                self._where[name] = f

    def _safetensors_names(self, path: Path) -> list[str]:
        from safetensors import safe_open

        try:
            handle = safe_open(str(path), framework="numpy")
        except Exception as err:  # the library raises several types for corrupt headers
            raise UserError(f"{path}: not a readable safetensors file ({err})") from None
        self._open[path] = handle.get_tensor
        return list(handle.keys())

    def _torch_names(self, path: Path) -> list[str]:
        try:
            import torch
        except ImportError:
            raise UserError(f"{path}: reading .bin checkpoints needs torch "
                            "(pip install torch==2.13.0), or convert them to safetensors") from None
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        self._open[path] = lambda name: state[name].float().numpy() if state[name].dtype == torch.bfloat16 \
            else state[name].numpy()
        return list(state.keys())

    def names(self) -> set[str]:
        return set(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise UserError(f"{self.model_dir}: checkpoint has no tensor {name}")
        return self._open[self._where[name]](name)


def hf_names_for(param_name: str) -> tuple[str, ...]:
    """The checkpoint tensors that make up one of our parameters (several for fused matrices)."""
    m = _LAYER.match(param_name)
    if m and m.group(2) in _FUSED:
        return tuple(m.group(1) + part for part in _FUSED[m.group(2)])
    return (param_name,)


def fused_tensor(reader: CheckpointReader, param_name: str) -> np.ndarray:
    """One of our parameters from the checkpoint, concatenating the parts of a fused matrix."""
    parts = [reader.get(n) for n in hf_names_for(param_name)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


def iter_params(model_dir: Path, expected: list[ParamSpec],
                quantize: QuantizeWeight | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) for each expected (name, shape, dtype), in order.

    Float tensors are cast to the expected dtype; integer tensors (packed codes, indices) must
    already have it, since a cast would silently change their meaning. With ``quantize``, a
    parameter ``<linear>.<field>`` that the checkpoint lacks is ``quantize(<linear>.weight)[field]``
    (each weight quantized once, for all of its fields).
    """
    reader = CheckpointReader(model_dir)
    quantized: dict[str, dict[str, np.ndarray]] = {}  # the Linear being emitted, by name
    for name, shape, dtype in expected:
        linear, _, field = name.rpartition(".")
        if quantize is not None and name not in reader and field != "weight":
            if linear not in quantized:
                quantized = {linear: quantize(fused_tensor(reader, f"{linear}.weight"))}
            array = quantized[linear][field]
        else:
            array = fused_tensor(reader, name)
        if tuple(array.shape) != tuple(shape):
            raise UserError(f"{model_dir}: {name} has shape {tuple(array.shape)} but config.json implies "
                            f"{tuple(shape)}; config and weights do not belong together")
        if array.dtype != np.dtype(dtype) and not np.issubdtype(array.dtype, np.floating):
            raise UserError(f"{model_dir}: {name} is {array.dtype}, the model reads {dtype}; "
                            "the checkpoint was written for another layout")
        yield name, np.ascontiguousarray(array.astype(dtype, copy=False))


def read_tokenizer_files(model_dir: Path) -> list[Path]:
    """Tokenizer files to ship in a package; tokenizer.json is required (the runtime uses `tokenizers`)."""
    model_dir = Path(model_dir)
    if not (model_dir / "tokenizer.json").is_file():
        raise UserError(f"{model_dir}: no tokenizer.json; the runtime needs a Hugging Face fast tokenizer file")
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
    return [model_dir / n for n in names if (model_dir / n).is_file()]


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
