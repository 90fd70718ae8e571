"""Relax model -> compiled TVM library with MLC's entry points and a `_metadata` function.

The pipeline is TVM's default for the target (dlight schedules on CUDA), with one step added after
static memory planning: it records each entry point's planned memory and attaches `_metadata`, a
function returning JSON (parameters, KV-cache shape, memory use) that the runtime reads to check
the weights it loads and to size the cache.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline
from tvm.relax.backend.cuda import pipeline as cuda_pipeline
from tvm.s_tir import dlight as dl
from tvm.target import Target

from atom_tvm.hf_weights import ParamSpec
from atom_tvm.quantization.schemes import QuantizationScheme
from relax_models.atom_kv_cache import AtomKVConfig
from relax_models.llama import LlamaConfig, LlamaForCausalLM
from tir_kernels.cpu_gemm import CPUGemm


def _planned_bytes(func: relax.Function) -> int:
    """Bytes of the statically sized storages that memory planning allocated in one function."""
    total = 0

    def visit(expr):
        nonlocal total
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == "relax.memory.alloc_storage":
            size = expr.args[0]
            if isinstance(size, relax.ShapeExpr) and all(isinstance(v, tvm.tirx.IntImm) for v in size.values):
                total += int(size.values[0])

    relax.analysis.post_order_visit(func.body, visit)
    return total


def _attach_metadata(metadata: dict) -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name="AttachAtomMetadata")
    def attach(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        usage = {gv.name_hint: _planned_bytes(f) for gv, f in mod.functions.items()
                 if isinstance(f, relax.Function)}
        text = json.dumps({**metadata, "memory_usage": usage})
        bb = relax.BlockBuilder(mod)
        with bb.function("_metadata", params=[]):
            bb.emit_func_output(tvm.ir.StringImm(text))
        return bb.finalize()

    return attach


# TVM's default pass lists per target, read from each backend's pipeline module (0.27's
# tvm.relax.pipeline.dataflow_lower_passes looks them up on the package, which does not export them).
_BACKEND_PIPELINES = {"llvm": cpu_pipeline, "cuda": cuda_pipeline}


def _pipeline(target: Target, metadata: dict) -> tvm.transform.Pass:
    backend = _BACKEND_PIPELINES[target.kind.name]
    finalize = backend.finalize_passes(target)
    # finalize_passes starts with StaticPlanBlockMemory: the metadata pass reads its result.
    assert finalize[0].info.name == "StaticPlanBlockMemory", finalize[0].info.name
    return tvm.transform.Sequential([
        # nn.Linear is matmul(x, permute_dims(W)): without this the weights are transposed by a
        # separate kernel on every call; fused, the GEMM reads W in its stored [out, in] layout.
        relax.transform.FuseTransposeMatmul(),
        *backend.library_dispatch_passes(target),
        *backend.legalize_passes(target),
        # llvm leaves the legalized GEMMs as naive single-threaded loops: schedule the NT matmuls.
        *([dl.ApplyDefaultSchedule(CPUGemm())] if target.kind.name == "llvm" else []),
        *backend.dataflow_lower_passes(target),
        finalize[0],
        _attach_metadata(metadata),
        *finalize[1:],
    ])


def export_model(cfg: LlamaConfig, scheme: QuantizationScheme, target: Target,
                 atom_kv: AtomKVConfig | None = None, tensor_parallel_shards: int = 1
                 ) -> tuple[tvm.IRModule, list[ParamSpec]]:
    """The Relax module of the Llama (one shard's, with ``tensor_parallel_shards``) in ``scheme``'s
    dtype with its modules swapped by the scheme's mutator, and the parameters it takes."""
    model = LlamaForCausalLM(cfg, scheme.dtype, target, atom_kv, tensor_parallel_shards)
    model.to(scheme.dtype)  # before the mutator: its modules' parameters keep their own dtypes
    if target.kind.name == "llvm" and scheme.dtype == "float16":
        # The generic x86-64 target has no F16C: every float16 operand of a GEMM is converted by a
        # library call, once per output row, which made the vocabulary-sized head of a float16
        # SmolLM2 take 1.7 s a token and 2 minutes for 64 prefill logits. Its weights stay float32.
        model.vocab_matrices_to("float32")
    model = scheme.mutate(model, cfg, target)
    mod, named_params = model.export_tvm(spec=model.get_default_spec())
    params = [(name, tuple(int(d) for d in p.shape), str(p.dtype)) for name, p in named_params]
    return mod, params


def compile_model(cfg: LlamaConfig, scheme: QuantizationScheme, target: Target, archs: list[str],
                  lib_path: Path, metadata: dict, atom_kv: AtomKVConfig | None = None,
                  tensor_parallel_shards: int = 1) -> list[ParamSpec]:
    """Compile and export the library; returns the (name, shape, dtype) of each parameter it takes.
    ``atom_kv`` builds in Atom's quantized KV cache instead of TVM's."""
    mod, params = export_model(cfg, scheme, target, atom_kv, tensor_parallel_shards)
    kv_layout = {"kind": "tvm", "num_hidden_layers": cfg.num_hidden_layers,
                 "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
                 "head_dim": cfg.head_dim}
    if atom_kv is not None:
        kv_layout = atom_kv.to_json()
    metadata = {
        **metadata,
        "params": [{"name": n, "shape": list(s), "dtype": d} for n, s, d in params],
        "kv_cache": {**kv_layout, "dtype": scheme.dtype},
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
    }
    compile_module(mod, target, archs, metadata).export_library(str(lib_path))
    return params


def compile_module(mod: tvm.IRModule, target: Target, archs: list[str], metadata: dict | None = None):
    """A Relax module through the package pipeline (``_metadata`` returns ``metadata``); CUDA code is
    compiled here by nvcc for ``archs``. Returns TVM's executable."""
    codegen = contextlib.nullcontext()
    if target.kind.name == "cuda":
        from atom_tvm.cuda_build import enable_cuda_codegen, use_nvcc_fatbin

        enable_cuda_codegen()
        codegen = use_nvcc_fatbin(archs)
    with codegen:
        return tvm.compile(mod, target, relax_pipeline=_pipeline(target, metadata or {}))
