"""The continuous-batching engine (`atom_tvm.runtime.batching`) on CPU packages.

A random tiny Llama (2 layers, GQA 4/2, head_dim 64, vocab 512, lm_head sharpened so tokens
matter) is built twice, with TVM's KV cache and with Atom's INT4 pages; its prefill chunk is 64
tokens, so longer prompts are chunked and prompts share steps with decode tokens.

The reference for "the same output as alone" is the chat runtime (`ChatModel`: `prefill` in chunks,
then `decode`, one sequence) with its own greedy loop here. A batched step can run a request's
token through another kernel than the reference did (a decode token inside `batch_prefill`), so
logits may differ in the last float bits: a token may differ only where the reference's two best
logits are within `TIE` of each other, after which the continuations legitimately part ways.
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from atom_tvm.errors import UserError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from atom_tvm.build import build  # noqa: E402
from atom_tvm.runtime.batching import Engine, SamplingParams, TextStream  # noqa: E402
from atom_tvm.runtime.engine import ChatModel, LoadedPackage  # noqa: E402

EOS = 2  # </s> of the tiny tokenizer
CONTEXT, CHUNK = 256, 64
TIE = 2e-3
N_REQUESTS = 200


def tiny_package(tmp_path_factory, kv_cache: str):
    """The tiny model built with ``--kv-cache kv_cache``, once per test session (the engine and
    server tests share it)."""
    root = tmp_path_factory.getbasetemp() / "serving-tiny"
    out = root / f"pkg-{kv_cache}"
    if out.is_dir():
        return out
    model_dir = root / "model"
    if not model_dir.is_dir():
        from tokenizers import Tokenizer, models, pre_tokenizers

        torch.manual_seed(5)
        cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=384, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                                       bos_token_id=1, eos_token_id=EOS)
        model = transformers.LlamaForCausalLM(cfg)
        with torch.no_grad():  # random init gives near-uniform logits; sharpen them so tokens matter
            model.lm_head.weight.mul_(8.0)
        staging = root / "model-staging"
        model.save_pretrained(staging)
        vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 512)}}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.save(str(staging / "tokenizer.json"))
        (staging / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
        staging.rename(model_dir)
    build(["--model", str(model_dir), "--target", "llvm", "--quantization", "fp32", "--kv-cache", kv_cache,
           "--prefill-chunk-size", str(CHUNK), "--context-window-size", str(CONTEXT), "--conv-template", "chatml",
           "-o", str(out)])
    return out


@pytest.fixture(scope="module", params=["tvm", "int4"])
def package(request, tmp_path_factory):
    return LoadedPackage(tiny_package(tmp_path_factory, request.param))


@pytest.fixture(scope="module")
def tvm_package(tmp_path_factory):
    return LoadedPackage(tiny_package(tmp_path_factory, "tvm"))


def mixed_requests(n: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """Prompts of 1 to 150 tokens (up to three prefill chunks) and max_tokens of 1 to 16."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, 512, int(rng.integers(1, 151))).tolist() for _ in range(n)]
    return prompts, [int(m) for m in rng.integers(1, 17, n)]


def greedy_alone(chat: ChatModel, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy tokens of one request run alone, and the gap between the two best logits at each."""
    chat.reset()
    logits = chat.prefill(prompt)
    tokens, gaps = [], []
    while True:
        row = logits.numpy().reshape(-1)
        best, second = np.sort(row)[-2:][::-1]
        tokens.append(int(row.argmax()))
        gaps.append(float(best - second))
        if tokens[-1] == EOS or len(tokens) == max_tokens:
            return tokens, gaps
        logits = chat.decode(tokens[-1])


def assert_same_as_alone(outputs: list[list[int]], references) -> int:
    """Each output equals its reference up to a near-tie; returns how many parted at a tie."""
    ties = 0
    for i, (got, (want, gaps)) in enumerate(zip(outputs, references)):
        if got == want:
            continue
        first = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        assert first < min(len(got), len(want)) and gaps[first] < TIE, (i, first, got, want, gaps[:first + 1])
        ties += 1
    assert ties <= 3, f"{ties} requests parted from their reference at near-ties"
    return ties


def run_checking_pages(engine: Engine, prompts, params) -> list:
    """Submit everything, step until done, and check the KV pages after every step: never over
    the budget, and exactly the pages of the running requests' cached tokens."""
    handles = [engine.submit(p, q) for p, q in zip(prompts, params)]
    seen = {"queued_while_pages_short": False, "max_pages": 0}
    while engine.has_work():
        engine.step()
        used = engine.kv_pages_used
        running = engine._running  # the engine's own list of requests holding sequences
        assert used <= engine.kv_pages_total
        assert used == sum(-(-r.num_cached // engine.page_size) for r in running)
        seen["max_pages"] = max(seen["max_pages"], used)
        if engine.metrics()["waiting"] and len(running) < engine.max_batch:
            seen["queued_while_pages_short"] = True
    assert engine.kv_pages_used == 0
    return [h.result() for h in handles], seen


@pytest.fixture(scope="module")
def references(package):
    prompts, max_tokens = mixed_requests(N_REQUESTS)
    chat = ChatModel(package.package_dir, "cpu")
    return prompts, max_tokens, [greedy_alone(chat, p, m) for p, m in zip(prompts, max_tokens)]


def test_200_mixed_requests_batched_give_the_same_greedy_outputs_as_alone(package, references):
    prompts, max_tokens, refs = references
    engine = Engine(package, max_batch=16, kv_tokens=4096)
    params = [SamplingParams(temperature=0, max_tokens=m) for m in max_tokens]
    results, seen = run_checking_pages(engine, prompts, params)
    assert_same_as_alone([r.token_ids for r in results], refs)
    for r, m in zip(results, max_tokens):
        assert r.finish_reason == ("stop" if r.token_ids[-1] == EOS else "length")
        assert len(r.token_ids) <= m
    m = engine.metrics()
    assert m["preemptions"] == 0 and m["finished"]["length"] + m["finished"]["stop"] == N_REQUESTS
    assert m["generated_tokens"] == sum(len(r.token_ids) for r in results)
    assert m["prefill_tokens"] == sum(map(len, prompts))  # nothing recomputed
    assert m["steps"] < sum(len(r.token_ids) for r in results) / 4  # requests did share steps
    assert sum(m["steps_by_kind"].values()) == m["steps"] and min(m["steps_by_kind"].values()) > 0


def test_a_small_kv_budget_queues_and_preempts_yet_changes_no_output(package, references):
    prompts, max_tokens, refs = references
    engine = Engine(package, max_batch=16, kv_tokens=320)  # 20 pages for tokens + 16, for 16 sequences
    params = [SamplingParams(temperature=0, max_tokens=m) for m in max_tokens]
    results, seen = run_checking_pages(engine, prompts[:80], params[:80])
    assert_same_as_alone([r.token_ids for r in results], refs[:80])
    m = engine.metrics()
    assert m["preemptions"] > 0 and seen["queued_while_pages_short"]
    assert m["prefill_tokens"] > sum(map(len, prompts[:80]))  # preempted requests recomputed their tokens


def test_cancel_frees_the_pages_before_the_next_step(tvm_package):
    engine = Engine(tvm_package, max_batch=2, kv_tokens=1024)
    prompts, _ = mixed_requests(3, seed=1)
    params = SamplingParams(temperature=0, max_tokens=200)
    handles = [engine.submit(p[:40], params) for p in prompts]  # the third waits: max_batch 2
    for _ in range(3):
        engine.step()
    running, waiting = handles[0], handles[2]
    pages_before = engine.kv_pages_used
    other = next(r for r in engine._running if r.id != running.request_id)
    running.cancel()
    waiting.cancel()
    engine.step()
    assert engine.kv_pages_used == -(-other.num_cached // engine.page_size) < pages_before
    assert running.result().finish_reason == waiting.result().finish_reason == "abort"
    assert engine.metrics()["finished"]["abort"] == 2
    while engine.has_work():
        engine.step()
    assert engine.kv_pages_used == 0


def test_cancel_from_another_thread_while_the_engine_thread_runs(tvm_package):
    engine = Engine(tvm_package, max_batch=4, kv_tokens=1024)
    engine.start()
    try:
        handle = engine.submit(list(range(3, 40)), SamplingParams(temperature=0, max_tokens=200))
        outputs = iter(handle)
        first = next(outputs)
        assert first.finish_reason is None and len(first.token_ids) == 1
        threading.Thread(target=handle.cancel).start()
        reasons = [out.finish_reason for out in outputs]
        assert reasons[-1] in ("abort", "stop")  # EOS may come first; then there was nothing to cancel
        assert engine.kv_pages_used == 0
    finally:
        engine.stop()


def test_stop_strings_cut_the_text_and_nothing_after_them_is_emitted(tvm_package):
    engine = Engine(tvm_package, max_batch=4, kv_tokens=1024)
    prompt = list(range(10, 30))
    full = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=20))[0]
    assert EOS not in full.token_ids, "pick another prompt: this one stops early"
    # The text continues the prompt's: every token is " w<id>", the first one's space included.
    assert full.text == "".join(f" w{t}" for t in full.token_ids)
    ends = np.cumsum([len(f" w{t}") for t in full.token_ids]).tolist()  # text length after each token
    # A stop string from inside the 4th token's text to inside the 5th's; the output stops at its
    # first occurrence, on the token that completes it.
    stop = full.text[ends[2] + 2:ends[4] - 1]
    cut = full.text.index(stop)
    tokens_to_stop = next(k + 1 for k, end in enumerate(ends) if end >= cut + len(stop))
    never = full.text[ends[0]:ends[1]] + " w0000"  # its start keeps appearing, the whole never does
    handle = engine.submit(prompt, SamplingParams(temperature=0, max_tokens=20, stop=(never, stop)))
    while engine.has_work():
        engine.step()
    deltas = list(handle)
    assert "".join(d.text for d in deltas) == full.text[:cut]
    assert deltas[-1].finish_reason == "stop"
    assert [t for d in deltas for t in d.token_ids] == full.token_ids[:tokens_to_stop]

    held = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=20, stop=(never,)))[0]
    assert held.text == full.text and held.finish_reason == "length"

    stop_id = full.token_ids[6]
    by_token = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=(stop_id,)))[0]
    kept = full.token_ids.index(stop_id)
    assert by_token.token_ids == full.token_ids[:kept + 1] and by_token.finish_reason == "stop"
    assert by_token.text == (full.text[:ends[kept - 1]] if kept else "")


def test_seeded_sampling_is_the_same_batched_and_alone(tvm_package):
    engine = Engine(tvm_package, max_batch=8, kv_tokens=2048)
    prompts, _ = mixed_requests(8, seed=3)
    params = [SamplingParams(temperature=0.9, top_p=0.9, max_tokens=16, seed=i) for i in range(8)]
    batched = engine.generate(prompts, params)
    alone = [engine.generate([p], q)[0] for p, q in zip(prompts, params)]
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    assert len({tuple(r.token_ids) for r in batched}) > 1


def test_requests_that_can_never_run_are_rejected_with_the_reason(tvm_package):
    engine = Engine(tvm_package, max_batch=2, kv_tokens=64)  # 6 pages: one request holds at most 80 tokens
    greedy = SamplingParams(temperature=0, max_tokens=8)
    cases = [
        ([], greedy, "empty prompt"),
        ([5] * CONTEXT, greedy, "context window"),
        ([5] * 40, SamplingParams(max_tokens=CONTEXT), "context window; lower max_tokens to at most 216"),
        ([5] * 60, SamplingParams(max_tokens=40), "more KV cache than the 80 tokens"),
        ([5, 512], greedy, "[0, 512)"),
        ([5], SamplingParams(temperature=-1), "temperature"),
        ([5], SamplingParams(top_p=0), "top_p"),
        ([5], SamplingParams(max_tokens=0), "max_tokens"),
        ([5], SamplingParams(stop=("",)), "stop"),
    ]
    for prompt, params, needle in cases:
        with pytest.raises(UserError) as err:
            engine.submit(prompt, params)
        assert needle in str(err.value), (needle, str(err.value))
    assert engine.metrics()["requests_rejected"] == len(cases) and not engine.has_work()
    assert engine.generate([[5] * 60], SamplingParams(temperature=0, max_tokens=20))[0].finish_reason


def test_engine_sizes_are_checked(tvm_package):
    with pytest.raises(UserError, match="prefill chunk of 64"):
        Engine(tvm_package, max_batch=65, kv_tokens=4096)
    with pytest.raises(UserError, match="max_batch 8 needs more than 8"):
        Engine(tvm_package, max_batch=8, kv_bytes=4096)
    with pytest.raises(UserError, match="tokens or bytes"):
        Engine(tvm_package, max_batch=8)
    # 2 layers x K,V x 2 heads x 64 dims x 4 bytes = 2 KiB a token: 1 MiB is 32 pages of 16 tokens.
    engine = Engine(tvm_package, max_batch=8, kv_bytes=2**20)
    assert engine.kv_pages_total == 32
    assert Engine(tvm_package, max_batch=8, kv_bytes=2**20, kv_tokens=64).kv_pages_total == 4 + 8


def test_text_stream_never_emits_half_a_character():
    """A byte-level BPE tokenizer trained here splits characters over several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["the cat sat on the mat", "café crème brûlée", "数据 模型 服务", "🙂 🚀 ok"] * 20
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    text = "the café 🚀 serves 数据 and 模型 🙂 crème"
    ids = tok.encode(text).ids
    assert len(ids) > len(text.split())  # characters do span tokens
    stream, pieces = TextStream(tok, stops=("brûlée",)), []
    for t in ids:
        assert not stream.push(t)
        pieces.append(stream.take())
    pieces.append(stream.take(final=True))
    assert all("\ufffd" not in p for p in pieces) and "".join(pieces) == text

    stream = TextStream(tok, stops=("🚀 serves",))
    out = []
    for t in ids:
        stopped = stream.push(t)
        out.append(stream.take(final=stopped))
        if stopped:
            break
    assert "".join(out) == "the café "

    stream = TextStream(tok)  # an output that ends inside a character gives out what it has
    for t in tok.encode("🚀").ids[:-1]:
        stream.push(t)
    assert stream.take() == "" and stream.take(final=True) == "\ufffd"


def test_smollm2_chat_prompts_batched_match_alone(smollm2_fp32_package):
    """The real model and tokenizer: chat prompts (one in French with accents) batched and alone."""
    from atom_tvm.conversation import get_template

    package = LoadedPackage(smollm2_fp32_package)
    template = get_template(None, package.config, package.tokenizer)
    questions = ["What is the capital of France?", "Écris une phrase sur le café crème.", "Name a planet."]
    prompts = [package.tokenizer.encode(template.render([{"role": "user", "content": q}]),
                                        add_special_tokens=False).ids for q in questions]
    stop_ids = template.stop_token_ids(package.tokenizer)
    engine = Engine(package, max_batch=3, kv_tokens=1024)
    params = SamplingParams(temperature=0, max_tokens=16, stop_token_ids=stop_ids)
    handles = [engine.submit(p, params) for p in prompts]
    while engine.has_work():
        engine.step()
    streams = [list(h) for h in handles]
    chat = ChatModel(smollm2_fp32_package, "cpu")
    refs = []
    for p in prompts:
        tokens, gaps = greedy_alone(chat, p, 16)
        end = next((i + 1 for i, t in enumerate(tokens) if t in stop_ids), len(tokens))
        refs.append((tokens[:end], gaps[:end]))
    assert_same_as_alone([[t for out in s for t in out.token_ids] for s in streams], refs)
    for s in streams:
        assert all("\ufffd" not in out.text for out in s)
        text = "".join(out.text for out in s)
        assert "<|im_end|>" not in text and text.strip()
    assert "Paris" in "".join(out.text for out in streams[0])
