"""Quantization schemes as build options (`python -m atom_tvm.build --quantization NAME`).

A scheme is everything a build needs to know about one way of quantizing the Relax Llama:

* its ``--quantization`` name, and the dtype the model runs in (activations, unquantized weights);
* the KV cache it implies (``--kv-cache`` default; atom-w4a4: INT4 pages);
* a module mutator (`QuantizationScheme.mutate`) that swaps the modules of `relax_models.llama`
  (``nn.Linear``, ``ResidualLinear``, the decoder layers' ``RMSNorm``, ``SiLUAndMul``) for quantized
  ones that call our TIR kernels through ``op.tensor_ir_op``; the model file itself knows nothing of
  quantization;
* the parameters of the mutated model, produced from the model directory
  (`QuantizationScheme.params`): cast from the Hugging Face weights, quantized from them at build
  time (w4a16, w8a8), or read from an Atom checkpoint (atom-w4a4);
* what `mlc-chat-config.json` records about it (`QuantizationScheme.to_json`).

The registry maps names to factories taking the model directory, its config and the build's
scheme options (``--group-size``), since some schemes read their settings from the checkpoint.
Each scheme lives in its own module of this package; `resolve` is the one entry point the build
uses.
"""

from __future__ import annotations

import abc
import dataclasses
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from tvm.relax.frontend import nn
from tvm.target import Target

from atom_tvm.errors import UserError
from atom_tvm.hf_weights import ParamSpec, iter_params
from relax_models.llama import LlamaConfig, LlamaDecoderLayer


@dataclasses.dataclass(frozen=True)
class SchemeOptions:
    """Build options that only some schemes use; ``None`` means the scheme's default."""

    group_size: int | None = None
    #: ``--tensor-parallel-shards``: the parameters and modules are those of one of this many shards.
    tensor_parallel_shards: int = 1


class QuantizationScheme(abc.ABC):
    """One ``--quantization`` choice; see the package docstring for the parts."""

    #: The ``--quantization`` name.
    name: str
    #: dtype of activations and of every parameter the scheme leaves unquantized.
    dtype: str = "float16"
    #: ``--kv-cache`` when the user gives none: tvm (TVM's cache in ``dtype``) or an Atom format.
    kv_cache: str = "tvm"

    def check_target(self, target_kind: str) -> None:
        """Refuse a target the scheme cannot be built for (default: every target)."""

    def mutate(self, model: nn.Module, cfg: LlamaConfig, target: Target) -> nn.Module:
        """The model with its modules swapped for quantized ones (called after ``model.to(dtype)``,
        so the new modules' parameters keep their own dtypes). Default: unchanged."""
        return model

    def params(self, model_dir: Path, expected: list[ParamSpec]) -> Iterator[tuple[str, np.ndarray]]:
        """(name, array) for each parameter of the mutated model, in order. Default: the Hugging
        Face weights, fused and cast."""
        return iter_params(model_dir, expected)

    def to_json(self) -> dict:
        """What `mlc-chat-config.json` records under ``quantization_config``."""
        return {"name": self.name, "dtype": self.dtype}

    def check_tensor_parallel(self, shards: int) -> None:
        """Refuse a shard count the scheme cannot split its parameters into (default: any the model
        allows, `LlamaConfig.check_tensor_parallel`)."""

    def shard_param(self, name: str, array: np.ndarray, cfg: LlamaConfig, shard: int, shards: int
                    ) -> tuple[str, np.ndarray] | None:
        """Parameter ``name`` of the one-shard model as shard ``shard`` of ``shards`` holds it (None:
        not on this shard). Default, for float weights: Megatron's split (qkv and gate_up by
        output rows, each of their parts evenly; o_proj and down_proj by input columns), everything
        else whole on every shard."""
        linear = name.rpartition(".")[0]
        if linear.endswith("qkv_proj"):
            return name, column_shard(array, qkv_rows(cfg), shard, shards)
        if linear.endswith("gate_up_proj"):
            return name, column_shard(array, [cfg.intermediate_size] * 2, shard, shards)
        if linear.endswith(("o_proj", "down_proj")):
            return name, np.ascontiguousarray(np.split(array, shards, axis=1)[shard])
        return name, array


SchemeFactory = Callable[[Path, LlamaConfig, SchemeOptions], QuantizationScheme]
_REGISTRY: dict[str, SchemeFactory] = {}


def register(name: str):
    """Class or function decorator: ``factory(model_dir, cfg, options)`` builds scheme ``name``."""

    def add(factory: SchemeFactory) -> SchemeFactory:
        _REGISTRY[name] = factory
        return factory

    return add


def names() -> list[str]:
    """Registered ``--quantization`` names, in registration order."""
    _load_schemes()
    return list(_REGISTRY)


def resolve(name: str, model_dir: Path, cfg: LlamaConfig, options: SchemeOptions = SchemeOptions()
            ) -> QuantizationScheme:
    """The configured scheme ``name`` for this model (checks the model against the scheme)."""
    _load_schemes()
    if name not in _REGISTRY:
        raise UserError(f"--quantization {name!r} is not supported; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name](Path(model_dir), cfg, options)


def _load_schemes() -> None:
    # Importing the modules registers them; the order here is the order `names` lists.
    from atom_tvm.quantization.schemes import fp16  # noqa: F401
    from atom_tvm.quantization.schemes import w4a16  # noqa: F401
    from atom_tvm.quantization.schemes import w8a8  # noqa: F401
    from atom_tvm.quantization.schemes import atom_w4a4  # noqa: F401


def qkv_rows(cfg: LlamaConfig) -> list[int]:
    """Rows of the q, k and v parts of the fused qkv matrix."""
    return [cfg.num_attention_heads * cfg.head_dim] + [cfg.num_key_value_heads * cfg.head_dim] * 2


def column_shard(array: np.ndarray, parts: list[int], shard: int, shards: int) -> np.ndarray:
    """Shard ``shard``'s rows of a column-parallel matrix stacked from ``parts`` (row counts): its
    even share of each part, concatenated in order."""
    pieces = np.split(array, np.cumsum(parts)[:-1], axis=0)
    return np.ascontiguousarray(np.concatenate([np.split(p, shards)[shard] for p in pieces]))


def refuse_tensor_parallel(name: str, shards: int) -> None:
    """For schemes whose Linears do not split yet: say which ones do."""
    if shards > 1:
        raise UserError(f"--quantization {name} has no tensor-parallel build yet; use fp16, fp32 or atom-w4a4 "
                        f"with --tensor-parallel-shards, or build {name} for one GPU")


def refuse_group_size(name: str, options: SchemeOptions) -> None:
    """For schemes without INT4 groups: a ``--group-size`` would be silently ignored, so refuse it."""
    if options.group_size is not None:
        raise UserError(f"--group-size is for w4a16 (atom-w4a4 takes it from its checkpoint); "
                        f"--quantization {name} has no groups")


# --- what the quantized modules share ----------------------------------------------------------------


class DecoderLinearMutator(nn.Mutator):
    """Every projection of every decoder layer (qkv, o, gate_up, down) becomes
    ``make_linear(in_features, out_features)``; lm_head and the norms stay as they are."""

    def __init__(self, make_linear: Callable[[int, int], nn.Module]):
        self.make_linear = make_linear

    def visit_module(self, name: str, node: nn.Module):
        if not isinstance(node, LlamaDecoderLayer):
            return super().visit_module(name, node)
        for parent, attr in ((node.self_attn, "qkv_proj"), (node.self_attn, "o_proj"),
                             (node.mlp, "gate_up_proj"), (node.mlp, "down_proj")):
            linear = getattr(parent, attr)
            setattr(parent, attr, self.make_linear(linear.in_features, linear.out_features))
        return node
