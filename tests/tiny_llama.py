"""The random tiny Llama the W4A4 package tests build: 2 layers, hidden 256, 384 MLP channels, 4 query
and 2 KV heads (so 2 tensor-parallel shards split every part), with the word-level test tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np


def save_tiny_llama(out: Path, tokenizer_dir: Path, seed: int, vary_norms: bool = False) -> Path:
    """A Hugging Face directory of the tiny Llama drawn with torch seed ``seed``; ``vary_norms`` draws
    the norm weights from U(0.5, 1.5) instead of ones, so a reorder that misplaces them shows."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=384, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # random init gives near-uniform logits; sharpen them
        if vary_norms:
            for layer in model.model.layers:
                for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                    norm.weight.uniform_(0.5, 1.5)
    model.save_pretrained(out)
    for f in Path(tokenizer_dir).iterdir():
        shutil.copy(f, Path(out) / f.name)
    return Path(out)


def calibration_text(path: Path, seed: int = 0, words: int = 3000) -> Path:
    """Random words of the tokenizer's vocabulary, for a tiny calibration."""
    Path(path).write_text(" ".join(f"w{i}" for i in np.random.default_rng(seed).integers(3, 512, words)))
    return Path(path)


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
