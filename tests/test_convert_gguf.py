"""Tests for atom_tvm.convert_gguf: the converted SmolLM2 directory must match transformers'
own GGUF loading exactly, and bad input must fail with a one-line message and no output."""

import json

import numpy as np
import pytest

from atom_tvm.convert_gguf import default_gguf_path, unpermute_rope_rows
from cli import assert_user_error, run_module

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def run_cli(*args):
    return run_module("atom_tvm.convert_gguf", *args)


@pytest.fixture(scope="module")
def converted(smollm2_conversion):
    out, proc = smollm2_conversion
    assert len([line for line in proc.stdout.splitlines() if line.startswith("[")]) == 5  # one per stage
    return out


def test_output_files(converted):
    names = sorted(p.name for p in converted.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors",
                     "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    # Nothing but the result in the parent: the temporary directory was renamed away.
    assert [p.name for p in converted.parent.iterdir()] == [converted.name]


def test_config_round_trip(converted):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(converted)
    assert cfg.model_type == "llama"
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)
    assert (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size) == (576, 64, 1536)
    assert cfg.num_hidden_layers == 30
    assert cfg.vocab_size == 49152
    assert cfg.tie_word_embeddings is True
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 2)
    raw = json.loads((converted / "config.json").read_text())
    assert raw["architectures"] == ["LlamaForCausalLM"]
    assert raw["rope_theta"] == 100000.0 and raw["rms_norm_eps"] == 1e-5
    assert raw["max_position_embeddings"] == 8192
    gen = json.loads((converted / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)


def test_safetensors_names_and_dtypes(converted):
    from safetensors.numpy import load_file

    tensors = load_file(converted / "model.safetensors")
    assert len(tensors) == 2 + 30 * 9  # tied embeddings: no lm_head.weight
    assert "lm_head.weight" not in tensors
    assert all(a.dtype == np.float32 for a in tensors.values())
    assert tensors["model.embed_tokens.weight"].shape == (49152, 576)
    assert tensors["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)
    assert tensors["model.layers.29.self_attn.k_proj.weight"].shape == (192, 576)
    assert tensors["model.layers.7.mlp.down_proj.weight"].shape == (576, 1536)
    assert tensors["model.norm.weight"].shape == (576,)


def test_tokenizer_files(converted):
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(str(converted / "tokenizer.json"))
    assert tok.get_vocab_size() == 49152
    assert tok.token_to_id("<|im_start|>") == 1 and tok.token_to_id("<|im_end|>") == 2
    cfg = json.loads((converted / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in cfg["chat_template"]
    assert (cfg["bos_token"], cfg["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert cfg["add_bos_token"] is False


def test_logits_match_transformers_gguf_loader(converted):
    gguf_path = default_gguf_path()
    """Same token ids and logits as transformers reading the GGUF itself: this is what
    proves the q/k row un-permutation and the tensor renaming."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours_tok = AutoTokenizer.from_pretrained(converted)
    ref_tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    text = ours_tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    ids = ours_tok(text, return_tensors="pt").input_ids
    assert ids.tolist() == ref_tok(text, return_tensors="pt").input_ids.tolist()
    assert ids.shape[1] > 20

    ours = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                               dtype=torch.float32).eval()
    with torch.no_grad():
        diff = (ours(ids).logits - ref(ids).logits).abs().max().item()
    assert diff < 1e-4

    # Independent of transformers' GGUF loader: a wrong q/k order would not answer this.
    with torch.no_grad():
        gen = ours.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in ours_tok.decode(gen[0, ids.shape[1]:])


def test_unpermute_inverts_llama_cpp_permutation():
    """llama.cpp's converter views rows as (heads, 2, head_dim/2) and swaps the last two
    axes; unpermute_rope_rows must be its exact inverse (checked for 3 heads of dim 8)."""
    n_head, head_dim, cols = 3, 8, 5
    hf = np.arange(n_head * head_dim * cols, dtype=np.float32).reshape(n_head * head_dim, cols)
    gguf_rows = hf.reshape(n_head, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(hf.shape)
    np.testing.assert_array_equal(unpermute_rope_rows(gguf_rows, n_head), hf)
    # Head 0 in GGUF order interleaves the halves: rows 0, 4, 1, 5, ...
    assert list(gguf_rows[:4, 0] // cols) == [0, 4, 1, 5]


def test_missing_gguf(tmp_path):
    missing, out = tmp_path / "nope.gguf", tmp_path / "out"
    assert_user_error(run_cli("--gguf", missing, "-o", out), missing)
    assert sorted(tmp_path.iterdir()) == []


def test_not_a_gguf(tmp_path):
    bogus, out = tmp_path / "bogus.gguf", tmp_path / "sub" / "out"
    bogus.write_text("this is not a gguf file\n")
    assert_user_error(run_cli("--gguf", bogus, "-o", out), bogus, "not a GGUF")
    assert sorted(tmp_path.iterdir()) == [bogus]


def test_non_llama_gguf(tmp_path):
    import gguf

    path, out = tmp_path / "gpt2.gguf", tmp_path / "out"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_user_error(run_cli("--gguf", path, "-o", out), path, "gpt2", "llama")
    assert sorted(tmp_path.iterdir()) == [path]


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_user_error(run_cli("-o", out), out, "--force")
    assert sorted(tmp_path.iterdir()) == [out]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_force_with_bad_input_keeps_existing_output(tmp_path):
    out, bogus = tmp_path / "out", tmp_path / "bogus.gguf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    bogus.write_bytes(b"\0" * 64)
    assert_user_error(run_cli("--gguf", bogus, "-o", out, "--force"), bogus)
    assert sorted(tmp_path.iterdir()) == sorted([out, bogus])
    assert (out / "keep.txt").read_text() == "mine"
