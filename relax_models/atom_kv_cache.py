"""Atom's quantized paged KV cache as the Relax model sees it (kernels: `tir_kernels.kv_attention`).

TVM's `PagedKVCache` is an opaque runtime object whose C++ side owns the pages and the page
tables. It has no hook for quantized pages, so ours is plain tensors instead, passed to the entry
points in the argument slot where TVM's object goes (``paged_kv_cache``), as one tuple:

    (kv_codes, kv_scale_zero,                       # the pages of every layer (int4/int8), or
     (kv_data,                                      # ... of every layer (fp16)
     qo_indptr, page_indptr, page_indices, last_page_len, append_slots, positions)

The page buffers come from the library's ``create_paged_kv_cache`` and live as long as the
cache; the six int32 arrays are the page tables of one forward step, which the host-side page
manager (`atom_tvm.runtime.kv_pages`) writes before each call. The model calls
``attention_with_fused_qkv`` on either cache alike; here each layer is

    append  (RoPE on q and k, K and V quantized into their page slots, pages written in place)
    decode  (one query per sequence)   or   prefill (ragged, causal)   over the pages

Every layer writes into the same page buffers (a leading layer axis), so in Relax each append is a
``call_tir_inplace`` whose result, the updated pages, is what the next kernel reads: that chain
is the data dependence that keeps the layers' appends and attentions in order.
"""

from __future__ import annotations

import dataclasses

from tvm import tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.target import Target

from atom_tvm.errors import UserError
from relax_models.kernel_calls import kernel_variant, opaque
from tir_kernels import kv_attention

#: KV formats of this cache (``bits`` of `tir_kernels.kv_attention`) by the name a build takes.
KV_FORMATS = {"int4": 4, "int8": 8, "fp16": 16}
#: The page tables of one step, in tuple order after the page buffers.
TABLE_NAMES = ("qo_indptr", "page_indptr", "page_indices", "last_page_len", "append_slots", "positions")


@dataclasses.dataclass(frozen=True)
class AtomKVConfig:
    """What the kernels are built for; recorded in the package so the runtime can size the pages."""

    kv_format: str
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rope_scaling: dict | None
    page_size: int = kv_attention.PAGE_SIZE

    def __post_init__(self):
        if self.kv_format not in KV_FORMATS:
            raise UserError(f"--kv-cache {self.kv_format!r}: choose one of tvm, {', '.join(KV_FORMATS)}")
        if self.num_kv_heads <= 0 or self.num_q_heads % self.num_kv_heads:
            raise UserError(f"--kv-cache {self.kv_format}: {self.num_q_heads} query heads do not split into "
                            f"groups of {self.num_kv_heads} KV heads")
        try:
            self.page_buffers(1)
        except UserError as err:
            raise UserError(f"--kv-cache {self.kv_format}: {err} (or build with --kv-cache tvm)") from None

    @property
    def bits(self) -> int:
        return KV_FORMATS[self.kv_format]

    def page_buffers(self, num_pages) -> list[tuple[tuple, str]]:
        """(shape, dtype) of the page buffers, every layer's pages in one buffer each; ``num_pages``
        may be symbolic (a name or an expression)."""
        shapes = kv_attention.page_shapes(self.num_layers, 1, self.num_kv_heads, self.head_dim, self.bits,
                                          self.page_size)
        return [((layers, num_pages, *rest), dtype) for (layers, _, *rest), dtype in shapes]

    def spec(self) -> list[nn.spec.Tensor]:
        """The nn spec of the ``paged_kv_cache`` tuple argument."""
        pages = [nn.spec.Tensor(list(shape), dtype) for shape, dtype in self.page_buffers("kv_num_pages")]
        tables = [nn.spec.Tensor(["kv_batch_plus_one"], "int32"), nn.spec.Tensor(["kv_batch_plus_one"], "int32"),
                  nn.spec.Tensor(["kv_num_used_pages"], "int32"), nn.spec.Tensor(["kv_batch"], "int32"),
                  nn.spec.Tensor(["kv_num_new_tokens"], "int32"), nn.spec.Tensor(["kv_num_new_tokens"], "int32")]
        return pages + tables

    def to_json(self) -> dict:
        return {"kind": "atom", "format": self.kv_format, "bits": self.bits, "page_size": self.page_size,
                "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_q_heads,
                "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim}


class AtomPagedKVCache:
    """One forward step's view of the cache: `attention_with_fused_qkv` like TVM's PagedKVCache."""

    def __init__(self, cfg: AtomKVConfig, target: Target, tensors, decode: bool):
        n_pages = len(cfg.page_buffers(1))
        if len(tensors) != n_pages + len(TABLE_NAMES):
            raise ValueError(f"the KV cache tuple has {len(tensors)} tensors, expected {n_pages + len(TABLE_NAMES)}")
        self.cfg, self.decode = cfg, decode
        self.pages = list(tensors[:n_pages])
        self.tables = dict(zip(TABLE_NAMES, tensors[n_pages:]))
        variant = kernel_variant(target)
        # One PrimFunc object per kernel, so the layers' calls share one function in the module.
        self.append_kernel = opaque(kv_attention.append(cfg.bits, cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim,
                                                        cfg.rope_theta, cfg.page_size, variant,
                                                        rope_scaling=cfg.rope_scaling))
        attend = kv_attention.decode if decode else kv_attention.prefill
        self.attend_kernel = opaque(attend(cfg.bits, cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim, cfg.page_size,
                                           variant))

    def attention_with_fused_qkv(self, layer_id: int, qkv: Tensor, num_q_heads: int, sm_scale: float) -> Tensor:
        """``qkv [b, s, H_q + 2 H_kv, D]`` -> attention output ``[b, s, H_q, D]`` in qkv's dtype.

        The kernels compute in float16 (the cache's format); a float32 model converts at the edges.
        """
        cfg = self.cfg
        if num_q_heads != cfg.num_q_heads or abs(sm_scale - cfg.head_dim**-0.5) > 1e-12:
            raise ValueError("the cache was configured for another attention layout or scale")
        b, s, heads, dim = qkv.shape
        n = b * s
        flat = op.reshape(qkv, (n, heads, dim))
        if flat.dtype != "float16":
            flat = flat.astype("float16")
        layer = tirx.IntImm("int32", layer_id)
        t = self.tables
        q_shape = (n, cfg.num_q_heads, dim)
        *self.pages, q = op.tensor_ir_inplace_op(
            self.append_kernel, "kv_append", [flat, t["positions"], t["append_slots"], *self.pages, layer],
            inplace_indices=[3 + i for i in range(len(self.pages))] + [-1],
            out=[Tensor.placeholder(p.shape, p.dtype) for p in self.pages] + [Tensor.placeholder(q_shape, "float16")])
        tables = [t["page_indptr"], t["page_indices"], t["last_page_len"]]
        out = Tensor.placeholder(q_shape, "float16")
        if self.decode:
            o = op.tensor_ir_op(self.attend_kernel, "kv_decode", [q, *self.pages, layer, *tables], out=out)
        else:
            o = op.tensor_ir_op(self.attend_kernel, "kv_prefill", [q, t["qo_indptr"], *self.pages, layer, *tables],
                                out=out)
        o = op.reshape(o, (b, s, cfg.num_q_heads, dim))
        return o if qkv.dtype == "float16" else o.astype(qkv.dtype)


def create_pages(cfg: AtomKVConfig, num_pages) -> tuple[Tensor, ...]:
    """Zeroed page buffers for ``num_pages`` pages of every layer (``create_paged_kv_cache``)."""
    return tuple(op.zeros(shape, dtype) for shape, dtype in cfg.page_buffers(num_pages))


def copy_pages(cfg: AtomKVConfig, target: Target, pages, src: Tensor, dst: Tensor) -> tuple[Tensor, ...]:
    """Every layer's page ``src[i]`` copied onto page ``dst[i]`` in place (copy-on-write after a fork)."""
    kernel = opaque(kv_attention.copy_pages(cfg.bits, cfg.num_kv_heads, cfg.head_dim, cfg.page_size,
                                            kernel_variant(target)))
    outs = op.tensor_ir_inplace_op(kernel, "kv_copy_pages", [*pages, src, dst],
                                   inplace_indices=list(range(len(pages))),
                                   out=[Tensor.placeholder(p.shape, p.dtype) for p in pages])
    return tuple(outs) if isinstance(outs, (list, tuple)) else (outs,)
