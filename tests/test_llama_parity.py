"""The compiled Relax Llama against transformers, on CPU in float32.

Random tiny Llamas cover the architecture switches (GQA, tied/untied embeddings, llama3 RoPE
scaling, chunked prefill); the real SmolLM2 covers a trained model on real prompts.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from atom_tvm.build import build  # noqa: E402
from atom_tvm.runtime.engine import ChatModel, GenerationConfig  # noqa: E402


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def hf_step_logits(hf_model, ids: list[int], n_steps: int) -> tuple[list[np.ndarray], list[int]]:
    """Greedy decoding with transformers: logits after the prompt and after each generated token."""
    logits_seq, tokens = [], []
    with torch.no_grad():
        out = hf_model(torch.tensor([ids]), use_cache=True)
        for _ in range(n_steps):
            logits = out.logits[0, -1].double().numpy()
            logits_seq.append(logits)
            tokens.append(int(logits.argmax()))
            out = hf_model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return logits_seq, tokens


def ours_step_logits(chat: ChatModel, ids: list[int], n_steps: int) -> tuple[list[np.ndarray], list[int]]:
    chat.reset()
    logits_seq, tokens = [], []
    logits = chat.prefill(ids)
    for _ in range(n_steps):
        row = logits.numpy().reshape(-1)
        logits_seq.append(row)
        tokens.append(int(row.argmax()))
        logits = chat.decode(tokens[-1])
    return logits_seq, tokens


TINY_VARIANTS = {
    "gqa-untied-bin": dict(tie_word_embeddings=False),
    "mha-tied-llama3rope": dict(tie_word_embeddings=True, num_key_value_heads=4, rope_theta=500000.0,
                                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
}


@pytest.fixture(scope="module", params=sorted(TINY_VARIANTS))
def tiny_llama(request, tmp_path_factory, tiny_tokenizer_dir):
    torch.manual_seed(sum(map(ord, request.param)))
    base = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
                bos_token_id=1, eos_token_id=2)
    cfg = transformers.LlamaConfig(**{**base, **TINY_VARIANTS[request.param]})
    hf = transformers.LlamaForCausalLM(cfg).eval()
    # Scale weights up from the tiny init so logits are far from uniform and errors show.
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(4.0 if p.dim() > 1 else 1.0)
    model_dir = tmp_path_factory.mktemp(f"hf-{request.param}")
    hf.save_pretrained(model_dir)
    if request.param.endswith("-bin"):  # a PyTorch .bin checkpoint instead of safetensors
        torch.save(hf.state_dict(), model_dir / "pytorch_model.bin")
        (model_dir / "model.safetensors").unlink()
    for f in tiny_tokenizer_dir.iterdir():
        (model_dir / f.name).write_bytes(f.read_bytes())
    out = tmp_path_factory.mktemp("dist") / request.param
    build(["--model", str(model_dir), "--target", "llvm", "--quantization", "fp32", "-o", str(out),
           "--prefill-chunk-size", "16", "--conv-template", "chatml"])
    return hf, ChatModel(out, "cpu")


def test_tiny_llama_matches_transformers(tiny_llama):
    hf, chat = tiny_llama
    rng = np.random.default_rng()
    ids = rng.integers(3, 512, size=37).tolist()  # 37 > 2 prefill chunks of 16, and past a 16-token page
    ref_logits, ref_tokens = hf_step_logits(hf, ids, 12)
    logits, tokens = ours_step_logits(chat, ids, 12)
    assert tokens == ref_tokens
    for ours, ref in zip(logits, ref_logits):
        assert rel_l2(ours, ref) < 1e-4


def test_generate_streams_greedy_tokens_and_stops_at_max_tokens(tiny_llama):
    hf, chat = tiny_llama
    ids = np.random.default_rng().integers(3, 512, size=9).tolist()
    _, ref_tokens = hf_step_logits(hf, ids, 6)
    chat.reset()
    got = list(chat.generate(ids, GenerationConfig(temperature=0, max_tokens=6, stop_token_ids=())))
    expected = ref_tokens[:ref_tokens.index(2) + 1] if 2 in ref_tokens else ref_tokens
    assert got == expected
    assert chat.stats["prefill_tokens"] == 9
