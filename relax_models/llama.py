"""Llama (2 and 3, and Llama-architecture models such as SmolLM2) in TVM Relax.

The module exports MLC-LLM's function names (`embed`, `prefill`, `decode`, `batch_prefill`,
`batch_decode`, `create_paged_kv_cache`, `get_logits`, `softmax_with_temperature`) so a package built
from it is laid out like an MLC package. Linear layers are plain `nn.Linear`: a quantization scheme
(`atom_tvm.quantization.schemes`) swaps modules out with a module mutator, so this file knows nothing
of quantization. The forward code only keeps the seams such a swap needs: each norm's output goes
straight into the projection that reads it (the projection derives the shapes), SiLU-and-mul is a
module of its own, and the two projections that end a block add the residual themselves
(`ResidualLinear`), so a quantized replacement can fuse norm and quantizer, activation and
quantizer, and GEMM and residual add.

Attention goes through a paged KV cache that applies RoPE (theta, llama3-style frequency scaling)
to q and k itself: TVM's (`TIRPagedKVCache`, pages in the model's dtype, an opaque runtime object) or
Atom's (`relax_models.atom_kv_cache`: INT4/INT8/FP16 pages, passed as a tuple of tensors). The layers
call `attention_with_fused_qkv` on either; only the entry points' cache argument differs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from tvm import relax, te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache
from tvm.target import Target

from atom_tvm.errors import UserError
from relax_models.atom_kv_cache import AtomKVConfig, AtomPagedKVCache, copy_pages, create_pages
from relax_models.kernel_calls import cached_kernel, out_tensor, rows
from tir_kernels.dense_gemm import fp16_gemm

SUPPORTED_MODEL_TYPES = ("llama",)


@dataclasses.dataclass
class LlamaConfig:
    """The parts of a Hugging Face Llama `config.json` the model needs."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int
    vocab_size: int
    rms_norm_eps: float
    head_dim: int
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    tie_word_embeddings: bool
    max_position_embeddings: int

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], source: str = "config.json") -> "LlamaConfig":
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UserError(
                f"{source}: model_type {model_type!r} is not supported; atom-tvm builds "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} models (Llama 2, Llama 3, SmolLM2)"
            )
        required = ("hidden_size", "intermediate_size", "num_attention_heads",
                    "num_hidden_layers", "vocab_size")
        missing = [k for k in required if k not in cfg]
        if missing:
            raise UserError(f"{source}: missing {', '.join(missing)}; is this a Hugging Face config.json?")
        heads = cfg["num_attention_heads"]
        kv_heads = cfg.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise UserError(f"{source}: num_attention_heads {heads} is not a multiple of "
                            f"num_key_value_heads {kv_heads}")
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        # transformers 5 moved rope settings into `rope_parameters`; older configs keep them flat.
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise UserError(f"{source}: rope_type {rope_type!r} is not supported (default, llama3)")
        rope_scaling = None
        if rope_type == "llama3":
            rope_scaling = {
                "rope_type": "llama3",
                "factor": float(rope["factor"]),
                "low_freq_factor": float(rope["low_freq_factor"]),
                "high_freq_factor": float(rope["high_freq_factor"]),
                "original_max_position_embeddings": int(rope["original_max_position_embeddings"]),
            }
        return cls(
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            num_hidden_layers=cfg["num_hidden_layers"],
            vocab_size=cfg["vocab_size"],
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            head_dim=head_dim,
            rope_theta=theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        )

    def check_tensor_parallel(self, shards: int) -> None:
        """Refuse a shard count that does not split the heads, the KV heads and the MLP evenly
        (each shard takes an equal contiguous part of each, Megatron-style)."""
        parts = {"num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
                 "intermediate_size": self.intermediate_size}
        if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
            raise UserError(f"--tensor-parallel-shards {shards!r}: must be an integer >= 1")
        bad = [f"{name} {n}" for name, n in parts.items() if n % shards]
        if bad:
            common = math.gcd(*parts.values())
            divisors = [d for d in range(1, common + 1) if common % d == 0]
            raise UserError(f"--tensor-parallel-shards {shards} does not divide this model's {', '.join(bad)}; "
                            f"each shard takes an equal share of the heads: use one of {divisors}")

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> "LlamaConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise UserError(f"{model_dir}: no config.json; pass a Hugging Face model directory "
                            "(python -m atom_tvm.convert_gguf makes one from the bundled SmolLM2)")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        return cls.from_hf_dict(cfg, str(path))


class ResidualLinear(nn.Linear):
    """``x W^T + residual``: a projection whose output joins the residual stream, as one module so a
    quantized replacement can add the residual in its GEMM's epilogue.

    Under tensor parallelism (``shards > 1``) it is row-parallel: each shard holds the columns of its
    slice of ``x``, its partial product is summed over the shards (all-reduce), then the residual
    (the same on every shard) is added once."""

    def __init__(self, in_features: int, out_features: int, shards: int = 1):
        super().__init__(in_features, out_features, bias=False)
        self.shards = shards

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return all_reduce(super().forward(x), self.shards) + residual


def all_reduce(partial: Tensor, shards: int) -> Tensor:
    """The sum of a row-parallel layer's partial products over the shards (identity on one)."""
    return op.ccl_allreduce(partial, "sum") if shards > 1 else partial


class SiLUAndMul(nn.Module):
    """``SiLU(gate) * up`` of the fused gate_up projection's output (gate first)."""

    def forward(self, gate_up: Tensor) -> Tensor:
        gate, up = op.split(gate_up, 2, axis=-1)
        return op.silu(gate) * up


class LlamaAttention(nn.Module):
    """One shard's attention heads: ``shards`` splits the query and KV heads evenly (qkv column-parallel,
    o_proj row-parallel)."""

    def __init__(self, cfg: LlamaConfig, shards: int = 1):
        self.num_q_heads = cfg.num_attention_heads // shards
        self.num_kv_heads = cfg.num_key_value_heads // shards
        self.head_dim = cfg.head_dim
        qkv_out = (self.num_q_heads + 2 * self.num_kv_heads) * self.head_dim
        # q, k and v share one matrix so the projection is one GEMM and the cache gets fused qkv.
        self.qkv_proj = nn.Linear(cfg.hidden_size, qkv_out, bias=False)
        self.o_proj = ResidualLinear(self.num_q_heads * self.head_dim, cfg.hidden_size, shards)

    def forward(self, x, kv: PagedKVCache | AtomPagedKVCache, layer_id: int, residual: Tensor) -> Tensor:
        """``residual + attention(x)``; ``x`` is whatever the layer's input norm returns (the shapes
        come from the projection's output, so a quantized norm may hand over packed tensors)."""
        qkv = self.qkv_proj(x)
        b, s, _ = qkv.shape
        qkv = op.reshape(qkv, (b, s, self.num_q_heads + 2 * self.num_kv_heads, self.head_dim))
        out = kv.attention_with_fused_qkv(layer_id, qkv, self.num_q_heads, sm_scale=self.head_dim**-0.5)
        return self.o_proj(op.reshape(out, (b, s, self.num_q_heads * self.head_dim)), residual)


class LlamaMLP(nn.Module):
    """One shard's slice of the intermediate channels (gate_up column-parallel, down_proj row-parallel)."""

    def __init__(self, cfg: LlamaConfig, shards: int = 1):
        self.intermediate_size = cfg.intermediate_size // shards
        # gate and up share one matrix: one GEMM, then SiLU(gate) * up.
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * self.intermediate_size, bias=False)
        self.act = SiLUAndMul()
        self.down_proj = ResidualLinear(self.intermediate_size, cfg.hidden_size, shards)

    def forward(self, x, residual: Tensor) -> Tensor:
        """``residual + MLP(x)``, ``x`` as in `LlamaAttention.forward`."""
        return self.down_proj(self.act(self.gate_up_proj(x)), residual)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, shards: int = 1):
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False)
        self.self_attn = LlamaAttention(cfg, shards)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False)
        self.mlp = LlamaMLP(cfg, shards)

    def forward(self, x: Tensor, kv: PagedKVCache | AtomPagedKVCache, layer_id: int) -> Tensor:
        x = self.self_attn(self.input_layernorm(x), kv, layer_id, residual=x)
        return self.mlp(self.post_attention_layernorm(x), residual=x)


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig, shards: int = 1):
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([LlamaDecoderLayer(cfg, shards) for _ in range(cfg.num_hidden_layers)])
        self.norm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False)

    def forward(self, x: Tensor, kv: PagedKVCache | AtomPagedKVCache) -> Tensor:
        for layer_id, layer in enumerate(self.layers):
            x = layer(x, kv, layer_id)
        return self.norm(x)


_fp16_gemm = cached_kernel(fp16_gemm)


def _vocab_kernel(target: Target, weight: nn.Parameter):
    """The vocabulary projection's kernel: on CUDA our dense fp16 GEMM (`tir_kernels.dense_gemm`,
    float32 sums), which reads a Llama-2-13B head 3.5x faster at decode than TVM's matmul (dlight's
    float16-summing GEMV) and is 6.7x faster at batch 128 on an H100 (docs/bench/gemm.md, "Session
    10"). None, for TVM's matmul: other targets, a float32 head, or a shape the GEMM's tiling
    refuses (it raises UserError for those)."""
    if target.kind.name != "cuda" or weight.dtype != "float16":
        return None
    vocab, hidden = (int(d) for d in weight.shape)
    try:
        return _fp16_gemm(target, vocab, hidden, False)
    except UserError:
        return None


class LlamaForCausalLM(nn.Module):
    """Llama with MLC-LLM's entry points; hidden states in `dtype`, logits always float32.

    ``atom_kv`` selects Atom's quantized cache; without it the entry points take TVM's.
    ``tensor_parallel_shards`` > 1 makes this one shard's program (the same on every GPU of a Disco
    session): its share of the heads and MLP channels, an all-reduce after o_proj and down_proj, and
    the embeddings, norms and lm_head whole on every shard, so every shard ends with the same logits.
    """

    def __init__(self, cfg: LlamaConfig, dtype: str, target: Target, atom_kv: AtomKVConfig | None = None,
                 tensor_parallel_shards: int = 1):
        cfg.check_tensor_parallel(tensor_parallel_shards)
        if tensor_parallel_shards > 1 and atom_kv is None:
            raise UserError(f"--tensor-parallel-shards {tensor_parallel_shards} needs Atom's KV cache "
                            "(--kv-cache int4, int8 or fp16): TVM's cache object is not driven per shard")
        self.cfg = cfg
        self.tensor_parallel_shards = tensor_parallel_shards
        self.model = LlamaModel(cfg, tensor_parallel_shards)
        self.tie_word_embeddings = cfg.tie_word_embeddings
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.dtype = dtype
        self.target = target
        self.atom_kv = atom_kv

    def _cache(self, paged_kv_cache, decode: bool):
        if self.atom_kv is None:
            return paged_kv_cache
        return AtomPagedKVCache(self.atom_kv, self.target, paged_kv_cache, decode)

    def vocab_matrices_to(self, dtype: str) -> None:
        """Keep the vocabulary-sized matrices (embedding, lm_head) in ``dtype`` while the layers run
        in the model dtype: ``embed`` casts its rows to the model dtype, ``get_logits`` multiplies in
        the head's dtype."""
        self.model.embed_tokens.to(dtype)
        if not self.tie_word_embeddings:
            self.lm_head.to(dtype)

    def get_logits(self, hidden_states: Tensor) -> Tensor:
        head = self.model.embed_tokens if self.tie_word_embeddings else self.lm_head
        if hidden_states.dtype != head.weight.dtype:
            hidden_states = hidden_states.astype(head.weight.dtype)
        kernel = _vocab_kernel(self.target, head.weight)
        if kernel is not None:
            flat, lead = rows(hidden_states)
            vocab = head.weight.shape[0]
            logits = op.tensor_ir_op(kernel, "fp16_gemm", [flat, head.weight],
                                     out=out_tensor((flat.shape[0], vocab), "float16"))
            logits = op.reshape(logits, (*lead, vocab))
        elif self.tie_word_embeddings:
            logits = op.matmul(hidden_states, op.permute_dims(head.weight))
        else:
            logits = self.lm_head(hidden_states)
        return logits.astype("float32") if logits.dtype != "float32" else logits

    def embed(self, input_ids: Tensor) -> Tensor:
        rows = self.model.embed_tokens(input_ids)
        return rows if rows.dtype == self.dtype else rows.astype(self.dtype)

    def prefill(self, input_embed: Tensor, paged_kv_cache):
        """One sequence's prompt chunk: logits of its last token."""
        hidden = self.model(input_embed, self._cache(paged_kv_cache, decode=False))

        def last_token(x: te.Tensor) -> te.Tensor:
            b, s, h = x.shape
            return te.compute((b, 1, h), lambda i, _, k: x[i, s - 1, k], name="last_token")

        hidden = op.tensor_expr_op(last_token, "last_token", [hidden])
        return self.get_logits(hidden), paged_kv_cache

    def decode(self, input_embed: Tensor, paged_kv_cache):
        hidden = self.model(input_embed, self._cache(paged_kv_cache, decode=True))
        return self.get_logits(hidden), paged_kv_cache

    def batch_prefill(self, input_embeds: Tensor, logit_positions: Tensor, paged_kv_cache):
        """Ragged prompts packed into one row; logits at `logit_positions` (one per sequence)."""
        hidden = self.model(input_embeds, self._cache(paged_kv_cache, decode=False))
        picked = op.take(hidden, logit_positions, axis=1)
        return self.get_logits(picked), paged_kv_cache

    def batch_decode(self, input_embeds: Tensor, paged_kv_cache):
        hidden = self.model(input_embeds, self._cache(paged_kv_cache, decode=True))
        return self.get_logits(hidden), paged_kv_cache

    def create_paged_kv_cache(
        self,
        max_batch_size: tirx.Var,
        max_total_seq_len: tirx.Var,
        prefill_chunk_size: tirx.Var,
        page_size: tirx.Var,
        support_sliding_window: tirx.Var,
    ):
        """TVM's cache object, or Atom's page buffers for ``max_total_seq_len`` tokens (whole pages;
        Atom's page size is the one its kernels were built for, and the runtime checks it)."""
        cfg = self.cfg
        if self.atom_kv is not None:
            p = self.atom_kv.page_size
            return create_pages(self.atom_kv, (max_total_seq_len + p - 1) // p)
        return TIRPagedKVCache(
            attn_kind="mha",
            max_batch_size=max_batch_size,
            max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size,
            page_size=page_size,
            support_sliding_window=support_sliding_window,
            layer_partition=relax.ShapeExpr([0, cfg.num_hidden_layers]),
            num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_key_value_heads,
            qk_head_dim=cfg.head_dim,
            v_head_dim=cfg.head_dim,
            mla_original_qk_head_dim=0,
            mla_original_v_head_dim=0,
            rope_mode=RopeMode.NORMAL,
            rope_scale=1,
            rope_theta=cfg.rope_theta,
            rope_scaling=cfg.rope_scaling or {},
            rope_ext_factors=relax.prim_value(0),
            rotary_dim=cfg.head_dim,
            enable_disaggregation=False,
            dtype=self.dtype,
            target=self.target,
        )

    def copy_kv_pages(self, kv_pages, src_pages: Tensor, dst_pages: Tensor):
        """Atom cache only: page ``src_pages[i]`` of every layer copied onto ``dst_pages[i]``, in place."""
        return copy_pages(self.atom_kv, self.target, list(kv_pages), src_pages, dst_pages)

    def softmax_with_temperature(self, logits: Tensor, temperature: Tensor) -> Tensor:
        b, s, v = logits.shape
        scaled = logits / op.reshape(temperature, (b, 1, 1))
        return op.softmax(scaled, axis=-1)

    def get_default_spec(self) -> nn.spec.ModuleSpec:
        h, d = self.cfg.hidden_size, self.dtype
        kv = nn.spec.Object(object_type=PagedKVCache) if self.atom_kv is None else self.atom_kv.spec()
        mod_spec = {
            "embed": {"input_ids": nn.spec.Tensor(["seq_len"], "int32"),
                      "$": {"param_mode": "packed", "effect_mode": "none"}},
            "prefill": {"input_embed": nn.spec.Tensor([1, "seq_len", h], d), "paged_kv_cache": kv,
                        "$": {"param_mode": "packed", "effect_mode": "none"}},
            "decode": {"input_embed": nn.spec.Tensor([1, 1, h], d), "paged_kv_cache": kv,
                       "$": {"param_mode": "packed", "effect_mode": "none"}},
            "batch_prefill": {"input_embeds": nn.spec.Tensor([1, "seq_len", h], d),
                              "logit_positions": nn.spec.Tensor(["batch_size"], "int32"),
                              "paged_kv_cache": kv,
                              "$": {"param_mode": "packed", "effect_mode": "none"}},
            "batch_decode": {"input_embeds": nn.spec.Tensor(["batch_size", 1, h], d), "paged_kv_cache": kv,
                             "$": {"param_mode": "packed", "effect_mode": "none"}},
            "get_logits": {"hidden_states": nn.spec.Tensor(["batch_size", h], d),
                           "$": {"param_mode": "packed", "effect_mode": "none"}},
            "create_paged_kv_cache": {
                "max_batch_size": int, "max_total_seq_len": int, "prefill_chunk_size": int,
                "page_size": int, "support_sliding_window": int,
                "$": {"param_mode": "none", "effect_mode": "none"}},
            "softmax_with_temperature": {
                "logits": nn.spec.Tensor(["batch_size", 1, "vocab_size"], "float32"),
                "temperature": nn.spec.Tensor(["batch_size"], "float32"),
                "$": {"param_mode": "none", "effect_mode": "none"}},
        }
        if self.atom_kv is not None:
            mod_spec["copy_kv_pages"] = {
                "kv_pages": self.atom_kv.spec()[:len(self.atom_kv.page_buffers(1))],
                "src_pages": nn.spec.Tensor(["num_copies"], "int32"),
                "dst_pages": nn.spec.Tensor(["num_copies"], "int32"),
                "$": {"param_mode": "none", "effect_mode": "none"}}
        return nn.spec.ModuleSpec.from_raw(mod_spec, self)
