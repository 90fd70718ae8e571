"""The real SmolLM2-135M-Instruct, converted from the bundled GGUF and compiled for the CPU (fp32).

The compiled model must give transformers' logits (relative L2 < 1e-3) and the same 32 greedy tokens
on real prompts, and the chat CLI must answer and survive bad input.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from cli import assert_user_error, run_module
from test_llama_parity import hf_step_logits, ours_step_logits, rel_l2

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CHAT_PROMPTS = ["What is the capital of France?", "Write a short poem about the sea."]
RAW_PROMPT = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
              "It is named after")


@pytest.fixture(scope="module")
def prompts(smollm2_fp32_package):
    from atom_tvm.conversation import get_template
    from tokenizers import Tokenizer

    config = json.loads((smollm2_fp32_package / "mlc-chat-config.json").read_text())
    tok = Tokenizer.from_file(str(smollm2_fp32_package / "tokenizer.json"))
    template = get_template("model", config, tok)
    texts = [template.render([{"role": "user", "content": p}]) for p in CHAT_PROMPTS] + [RAW_PROMPT]
    return [tok.encode(t, add_special_tokens=False).ids for t in texts]


def test_logits_and_32_greedy_tokens_match_transformers(smollm2_dir, smollm2_fp32_package, prompts):
    from atom_tvm.runtime.engine import ChatModel

    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    chat = ChatModel(smollm2_fp32_package, "cpu")
    for ids in prompts:
        ref_logits, ref_tokens = hf_step_logits(hf, ids, 32)
        logits, tokens = ours_step_logits(chat, ids, 32)
        assert tokens == ref_tokens
        errors = [rel_l2(ours, ref) for ours, ref in zip(logits, ref_logits)]
        assert max(errors) < 1e-3, errors


def test_chat_one_shot_answers(smollm2_fp32_package):
    proc = run_module("atom_tvm.chat", smollm2_fp32_package, "--prompt", "What is the capital of France?",
                      "--temperature", "0", "--max-tokens", "24")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_chat_repl_survives_bad_input(smollm2_fp32_package):
    too_long = "word " * 3000  # > the 2048-token context window of this package
    lines = ["", "/set temperature=banana", "/set nonsense=1", too_long, "/set temperature=0;max_tokens=16",
             "What is the capital of France?", "/stats", "/exit"]
    proc = run_module("atom_tvm.chat", smollm2_fp32_package, stdin="\n".join(lines) + "\n")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Traceback" not in out + proc.stderr
    assert "empty prompt" in out
    assert "temperature" in out and "nonsense" in out
    assert "does not fit" in out
    assert "Paris" in out
    assert "tok/s" in out


def test_sampling_with_a_seed_is_reproducible(smollm2_fp32_package):
    args = ("--prompt", "Tell me a story.", "--temperature", "0.9", "--top-p", "0.9", "--seed", "7",
            "--max-tokens", "12")
    first = run_module("atom_tvm.chat", smollm2_fp32_package, *args)
    second = run_module("atom_tvm.chat", smollm2_fp32_package, *args)
    assert first.returncode == 0 and first.stdout == second.stdout


@pytest.mark.parametrize("case", ["flipped-byte", "missing-shard", "wrong-dtype", "truncated-index"])
def test_corrupt_package_gives_one_line_error_naming_the_file(case, smollm2_fp32_package, tmp_path):
    import shutil

    pkg = tmp_path / "pkg"
    shutil.copytree(smollm2_fp32_package, pkg)
    index_path = pkg / "tensor-cache.json"
    index = json.loads(index_path.read_text())
    shard = pkg / index["records"][1]["dataPath"]
    if case == "flipped-byte":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x40
        shard.write_bytes(bytes(data))
        needle = shard.name
    elif case == "missing-shard":
        shard.unlink()
        needle = shard.name
    elif case == "wrong-dtype":
        index["records"][0]["records"][0]["dtype"] = "float16"
        index["records"][0]["records"][0]["nbytes"] //= 2
        index_path.write_text(json.dumps(index))
        needle = "tensor-cache.json"
    else:
        text = index_path.read_text()
        index_path.write_text(text[: len(text) // 2])
        needle = "tensor-cache.json"
    proc = run_module("atom_tvm.chat", pkg, "--prompt", "hi")
    assert_user_error(proc, needle)


def test_engine_rejects_empty_and_too_long_prompts_without_changing_state(smollm2_fp32_package):
    from atom_tvm.errors import UserError
    from atom_tvm.runtime.engine import ChatModel, GenerationConfig

    chat = ChatModel(smollm2_fp32_package, "cpu")
    for ids in ([], list(np.arange(3000) % 1000 + 100)):
        with pytest.raises(UserError):
            next(chat.generate(ids, GenerationConfig(temperature=0)))
        assert chat.num_cached_tokens == 0
