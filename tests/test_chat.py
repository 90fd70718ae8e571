"""Tests for atom_tvm.conversation (templates, incremental prompts) and atom_tvm.chat (the REPL).

Template outputs are compared with strings written out by hand from each format's definition.
The REPL is driven through run_repl with FakeEngine, a test double of
atom_tvm.runtime.engine.ChatModel that replays scripted replies over a real byte-level tokenizer
(one token per UTF-8 byte, plus the chat formats' special tokens), so multi-byte characters
arrive split across tokens exactly as they would from a real model.
"""

from __future__ import annotations

import io
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from atom_tvm.chat import SETTING_RULES, Settings, main, parse_set, run_repl
from atom_tvm.conversation import TEMPLATE_NAMES, Conversation, PromptDelta, get_template
from atom_tvm.errors import UserError

try:
    from atom_tvm.runtime.engine import GenerationConfig
except ImportError:  # the engine lands separately; this mirrors its documented interface
    @dataclass
    class GenerationConfig:
        temperature: float = 0.7
        top_p: float = 0.95
        max_tokens: int = 256
        seed: int | None = None
        stop_token_ids: tuple[int, ...] = ()


REPO_ROOT = Path(__file__).resolve().parents[1]

SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>"]

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SMOLLM2_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def make_tokenizer(specials=SPECIALS) -> Tokenizer:
    """Byte-level BPE with no merges: every UTF-8 byte is its own token."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(specials))
    return tok


TOK = make_tokenizer()
IM_END = TOK.token_to_id("<|im_end|>")


def history(*turns, system=None):
    """[system?, user, assistant, user, ...] from alternating user/assistant texts."""
    msgs = [{"role": "system", "content": system}] if system else []
    for i, text in enumerate(turns):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return msgs


# ----- templates ------------------------------------------------------------------------------

def test_llama2_template():
    t = get_template("llama-2", {})
    assert t.render(history("Hi", "Hello!", "Bye", system="You are terse.")) == (
        "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] Bye [/INST]")
    assert t.render(history("Hi")) == "<s>[INST] Hi [/INST]"
    assert t.stop_strs == ("</s>",)


def test_llama3_template():
    t = get_template("llama-3", {})
    assert t.render(history("Hi", "Hello!", "Bye", system="You are terse.")) == (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert t.render(history("Hi"), add_generation_prompt=False) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>")


def test_chatml_template():
    t = get_template("chatml", {})
    assert t.render(history("Hi", "Hello!", "Bye", system="You are terse.")) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_jinja_template_smollm2():
    t = get_template(None, {"conv_template": "model", "chat_template": SMOLLM2_TEMPLATE})
    # No system message: the template supplies its own.
    assert t.render(history("Hi")) == SMOLLM2_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert t.render(history("Hi", system="Be brief."), add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")
    assert t.stop_strs == ("<|im_end|>",)


def test_jinja_template_gets_bos_eos_from_tokenizer_and_raises_cleanly():
    source = ("{% if messages[-1]['role'] != 'user' %}{{ raise_exception('last message must be the user') }}{% endif %}"
              "{{ bos_token }}{% for m in messages %}{{ m['content'] | trim }}{{ eos_token }}{% endfor %}")
    config = {"chat_template": source, "bos_token_id": TOK.token_to_id("<s>"),
              "eos_token_id": [TOK.token_to_id("</s>")]}
    t = get_template("model", config, TOK)
    assert t.render(history(" Hi ")) == "<s>Hi</s>"  # BOS comes from the template text, once
    with pytest.raises(UserError, match="chat_template failed: last message must be the user"):
        t.render(history("Hi", "Hello"))
    with pytest.raises(UserError, match="does not parse"):
        get_template("model", {"chat_template": "{% for m in messages %}"})


def test_get_template_errors_name_the_choices():
    with pytest.raises(UserError) as err:
        get_template("vicuna", {})
    assert all(name in str(err.value) for name in TEMPLATE_NAMES)
    with pytest.raises(UserError, match="has none; pick one of llama-2, llama-3, chatml"):
        get_template("model", {"conv_template": "model"})
    with pytest.raises(UserError, match="role 'tool'"):
        get_template("chatml", {}).render([{"role": "tool", "content": "x"}])


def test_stop_token_ids_join_config_eos_and_template_markers():
    eot, end = TOK.token_to_id("<|eot_id|>"), TOK.token_to_id("<|end_of_text|>")
    t = get_template("llama-3", {"eos_token_id": end})
    assert t.stop_token_ids(TOK) == (end, eot)
    assert t.text_stop_strs(TOK) == ()
    # A tokenizer without the marker as one token: it has to be matched as text.
    assert get_template("chatml", {}).text_stop_strs(make_tokenizer(["<s>"])) == ("<|im_end|>",)


# ----- incremental prompts --------------------------------------------------------------------

@pytest.mark.parametrize("name, config, stop, first, second", [
    ("chatml", {}, "<|im_end|>",
     "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
     "\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"),
    ("llama-3", {}, "<|eot_id|>",
     "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
     "<|start_header_id|>assistant<|end_header_id|>\n\n",
     "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
    # The template writes " Hello! </s>", the model generated "Hello!</s>": the space is skipped.
    ("llama-2", {}, "</s>", "<s>[INST] Hi [/INST]", "<s>[INST] Bye [/INST]"),
    ("model", {"chat_template": SMOLLM2_TEMPLATE}, "<|im_end|>",
     SMOLLM2_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
     "\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"),
])
def test_prompt_delta_over_two_turns(name, config, stop, first, second):
    conv = Conversation(get_template(name, config))
    conv.add_user("Hi")
    assert conv.prompt_delta() == PromptDelta(first, restart=False)
    conv.add_assistant("Hello!", stop_text=stop)
    conv.add_user("Bye")
    assert conv.prompt_delta() == PromptDelta(second, restart=False)


@pytest.mark.parametrize("name, second", [
    ("chatml", "<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"),
    ("llama-2", " </s><s>[INST] Bye [/INST]"),
])
def test_prompt_delta_closes_a_reply_cut_by_max_tokens(name, second):
    conv = Conversation(get_template(name, {}))
    conv.add_user("Hi")
    conv.prompt_delta()
    conv.add_assistant("Hello", stop_text="")  # no stop marker was generated: the delta adds it
    conv.add_user("Bye")
    assert conv.prompt_delta() == PromptDelta(second, restart=False)


def test_prompt_delta_asks_for_restart_when_the_prefix_changes():
    # A template whose first line depends on the whole history cannot be fed incrementally.
    source = "{{ messages | length }}\n{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    conv = Conversation(get_template("model", {"chat_template": source}))
    conv.add_user("Hi")
    assert conv.prompt_delta() == PromptDelta("1\nuser: Hi\n", restart=False)
    conv.add_assistant("Hello", stop_text="")
    conv.add_user("Bye")
    assert conv.prompt_delta() == PromptDelta("3\nuser: Hi\nassistant: Hello\nuser: Bye\n", restart=True)


def test_checkpoint_rollback_and_reset_keep_system_message():
    conv = Conversation(get_template("chatml", {}), system_message="Sys")
    conv.add_user("Hi")
    conv.prompt_delta()
    conv.add_assistant("Hello", "<|im_end|>")
    cp = conv.checkpoint()  # between turns, as the REPL takes it
    conv.add_user("A message the engine refused")
    conv.prompt_delta()
    conv.rollback(cp)
    assert conv.messages == history("Hi", "Hello", system="Sys")
    conv.add_user("Again")  # the engine still holds the first prompt and reply
    assert conv.prompt_delta() == PromptDelta("\n<|im_start|>user\nAgain<|im_end|>\n<|im_start|>assistant\n",
                                              restart=False)
    conv.reset()
    assert conv.messages == [{"role": "system", "content": "Sys"}] and not conv.has_history
    conv.add_user("New")
    assert conv.prompt_delta() == PromptDelta(
        "<|im_start|>system\nSys<|im_end|>\n<|im_start|>user\nNew<|im_end|>\n<|im_start|>assistant\n", restart=False)


# ----- the REPL, against a fake engine ----------------------------------------------------------

class FakeEngine:
    """Test double for ChatModel: replays ``replies`` (str: reply then stop token; ("text", None):
    reply with no stop token) and keeps the token sequence as a real KV cache would."""

    def __init__(self, replies, context_window_size=512, tokenizer=TOK, stop_id=IM_END, lazy=False,
                 config=None, interrupt_at=None):
        self.tokenizer = tokenizer
        self.replies = list(replies)
        self.context_window_size = context_window_size
        self.stop_id = stop_id
        self.lazy = lazy  # raise "does not fit" on first next() (generator function) not on call
        self.config = config or {}
        self.sequence: list[int] = []
        self.calls: list[tuple[list[int], object]] = []
        self.resets = 0
        self.stats = {}
        self.interrupt_at = interrupt_at  # (call number, token index): simulate Ctrl-C there

    def reset(self):
        self.sequence = []
        self.resets += 1

    @property
    def num_cached_tokens(self):
        return len(self.sequence)

    def _check_fits(self, new_ids):
        free = self.context_window_size - len(self.sequence)
        if len(new_ids) > free:
            raise UserError(f"prompt of {len(new_ids)} tokens does not fit: {free} of "
                            f"{self.context_window_size} context tokens left")

    def generate(self, new_token_ids, gen):
        if not self.lazy:
            self._check_fits(new_token_ids)
        return self._run(list(new_token_ids), gen)

    def _run(self, new_ids, gen):
        self._check_fits(new_ids)
        self.calls.append((new_ids, gen))
        self.sequence += new_ids
        reply = self.replies.pop(0)
        text, stop = (reply, self.stop_id) if isinstance(reply, str) else reply
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids + ([stop] if stop is not None else [])
        self.stats = {"prefill_tokens": len(new_ids), "prefill_seconds": 0.5,
                      "decode_tokens": 0, "decode_seconds": 0.25}
        for i, tok in enumerate(ids[:gen.max_tokens]):
            if self.interrupt_at == (len(self.calls) - 1, i):
                raise KeyboardInterrupt
            if len(self.sequence) >= self.context_window_size:
                return
            self.sequence.append(tok)
            self.stats["decode_tokens"] += 1
            yield tok
            if tok in gen.stop_token_ids:
                return

    def text(self, ids=None):
        return self.tokenizer.decode(self.sequence if ids is None else ids, skip_special_tokens=False)


class RecordingOut(io.StringIO):
    """Output stream that also keeps every write separately, to check what streaming printed."""

    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, s):
        self.writes.append(s)
        return super().write(s)


def chat(engine, lines, template="chatml", system=None, settings=None):
    conv = Conversation(get_template(template, engine.config), system_message=system)
    out = RecordingOut()
    session = run_repl(engine, conv, lines, out, settings=settings, config_factory=GenerationConfig)
    return session, out.getvalue(), out


def test_two_turns_stream_replies_and_feed_only_the_new_prompt():
    engine = FakeEngine(["Hello!", "See you."])
    session, text, _ = chat(engine, ["Hi", "Bye"])
    assert text == "Hello!\nSee you.\n"
    assert engine.text(engine.calls[0][0]) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert engine.text(engine.calls[1][0]) == "\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
    # The KV sequence is exactly the rendered conversation (less the final turn's newline).
    full = session.conv.template.render(session.conv.messages, add_generation_prompt=False)
    assert engine.text() + "\n" == full
    assert session.conv.messages == history("Hi", "Hello!", "Bye", "See you.")
    assert engine.resets == 0


def test_set_changes_the_generation_config():
    engine = FakeEngine(["ok"])
    _, text, _ = chat(engine, ["/set temperature=0.5; top_p=0.8;max_tokens=64;seed=1;", "Hi"])
    assert text.splitlines()[0] == "temperature=0.5 top_p=0.8 max_tokens=64 seed=1"
    gen = engine.calls[0][1]
    assert (gen.temperature, gen.top_p, gen.max_tokens, gen.seed) == (0.5, 0.8, 64, 1)
    assert IM_END in gen.stop_token_ids


@pytest.mark.parametrize("arg, problem", [
    ("temperature=-1", "bad value temperature=-1: must be >= 0"),
    ("temperature=hot", "bad value temperature=hot: not a number"),
    ("top_p=0", "bad value top_p=0: must be in (0, 1]"),
    ("top_p=1.5", "bad value top_p=1.5: must be in (0, 1]"),
    ("max_tokens=0", "bad value max_tokens=0: must be >= 1"),
    ("max_tokens=2.5", "bad value max_tokens=2.5: not an integer"),
    ("seed=abc", "bad value seed=abc: not an integer"),
    ("presence_penalty=0.5", "unknown setting 'presence_penalty'"),
    ("temperature", "bad /set item 'temperature': expected key=value"),
    ("temperature=0.1;top_p=7", "bad value top_p=7"),  # all-or-nothing: temperature unchanged
])
def test_set_errors_are_one_line_and_change_nothing(arg, problem):
    engine = FakeEngine(["ok"])
    _, text, _ = chat(engine, [f"/set {arg}", "/set", "Hi"])
    error, current, reply = text.splitlines()
    assert error.startswith(f"error: {problem}") and error.endswith(SETTING_RULES)
    assert current == Settings().describe()
    assert reply == "ok"  # the REPL carried on


def test_parse_set_seed_none_and_settings_describe():
    s = parse_set("seed=7", Settings())
    assert s.seed == 7
    assert parse_set("seed=none", s).seed is None
    with pytest.raises(UserError, match="needs key=value"):
        parse_set(" ; ", s)


def test_stats_before_and_after_a_reply():
    engine = FakeEngine(["Hello!"])
    _, text, _ = chat(engine, ["/stats", "Hi", "/stats"])
    lines = text.splitlines()
    assert lines[0] == "no stats yet: send a message first"
    n_prefill = len(engine.calls[0][0])
    n_decode = len("Hello!") + 1  # one token per byte, plus the stop token
    assert lines[2] == (f"prefill: {n_prefill / 0.5:.1f} tok/s ({n_prefill} tokens, 0.500 s), "
                        f"decode: {n_decode / 0.25:.1f} tok/s ({n_decode} tokens, 0.250 s)")


def test_help_unknown_command_empty_prompt_reset_and_exit():
    engine = FakeEngine(["Hello!", "Again!"])
    session, text, _ = chat(engine, ["/help", "/frobnicate", "   ", "Hi", "/reset", "Yo", "/exit", "never sent"])
    assert "/set key=value" in text and "/stats" in text
    assert "unknown command '/frobnicate'; type /help for the list\n" in text
    assert "empty prompt: type a message, or /help\n" in text
    assert text.endswith("Hello!\nconversation reset\nAgain!\n")
    assert engine.resets == 1
    assert engine.text(engine.calls[1][0]) == "<|im_start|>user\nYo<|im_end|>\n<|im_start|>assistant\n"
    assert session.conv.messages == history("Yo", "Again!")
    assert len(engine.calls) == 2  # nothing after /exit


@pytest.mark.parametrize("lazy", [False, True], ids=["eager-error", "generator-error"])
def test_too_long_prompt_prints_engine_error_and_rolls_back(lazy):
    engine = FakeEngine(["Hello!", "See you."], context_window_size=80, lazy=lazy)
    session, text, _ = chat(engine, ["Hi", "x" * 200, "Bye"])
    lines = text.splitlines()
    assert lines[0] == "Hello!"
    assert lines[1].startswith("error: prompt of ") and "does not fit" in lines[1]
    assert lines[2] == "See you."
    # The refused message left no trace: the next delta follows the first reply directly.
    assert engine.text(engine.calls[1][0]) == "\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
    assert session.conv.messages == history("Hi", "Hello!", "Bye", "See you.")


def test_too_long_first_prompt_then_a_short_one():
    engine = FakeEngine(["Hello!"], context_window_size=40)
    session, text, _ = chat(engine, ["x" * 100, "Hi"])
    assert text.splitlines()[0].startswith("error: prompt of ")
    assert text.splitlines()[1] == "Hello!"
    assert session.conv.messages == history("Hi", "Hello!")


def test_context_full_mid_conversation_starts_over_with_the_message():
    engine = FakeEngine(["Hello!", "Fresh."], context_window_size=60)
    long_msg = "y" * 20
    session, text, _ = chat(engine, ["Hi", long_msg])
    lines = text.splitlines()
    assert lines[0] == "Hello!"
    assert lines[1].startswith("[context window full: prompt of ")
    assert lines[1].endswith("; starting a new conversation with your message]")
    assert lines[2] == "Fresh."
    assert session.conv.messages == history(long_msg, "Fresh.")
    assert engine.text() == f"<|im_start|>user\n{long_msg}<|im_end|>\n<|im_start|>assistant\nFresh.<|im_end|>"


def test_window_filling_up_during_a_reply_resets_the_conversation():
    prompt_len = len(TOK.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n").ids)
    engine = FakeEngine(["Hello there", "Ok"], context_window_size=prompt_len + 3)
    session, text, _ = chat(engine, ["Hi", "Hi"])
    assert text == ("Hel\n[context window full: the conversation was reset; your next message starts a new one]\n"
                    "Ok\n")
    assert engine.resets == 1
    # The second message went to an empty engine, as the first message of a new conversation.
    assert engine.text(engine.calls[1][0]) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert session.conv.messages == history("Hi", "Ok")


def test_max_tokens_cut_reply_is_closed_by_the_next_prompt():
    engine = FakeEngine(["Hello there", "ok"])
    _, text, _ = chat(engine, ["/set max_tokens=5", "Hi", "Bye"])
    assert text.splitlines()[1:] == ["Hello", "ok"]
    assert engine.text(engine.calls[1][0]) == "<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"


def test_streaming_never_prints_half_a_character():
    reply = "héllo 世界 👋"
    engine = FakeEngine([reply])
    _, text, out = chat(engine, ["Hi"])
    assert text == reply + "\n"
    assert not any("\ufffd" in w for w in out.writes)
    assert len([w for w in out.writes if w]) > 3  # it did stream, piece by piece


def test_text_stop_string_is_cut_and_never_shown():
    # This tokenizer has no <|im_end|> token, so the model spells it in bytes and the REPL must
    # find it in the text, holding back "<|im" until it knows.
    tok = make_tokenizer(["</s>"])
    engine = FakeEngine([("Sure<|im_end|>\n<|im_start|>user", None)], tokenizer=tok)
    session, text, out = chat(engine, ["Hi"])
    assert text == "Sure\n"
    assert not any("<" in w for w in out.writes)
    assert session.conv.messages[-1] == {"role": "assistant", "content": "Sure"}


def test_ctrl_c_during_a_reply_keeps_what_was_said():
    engine = FakeEngine(["Hello there", "ok"], interrupt_at=(0, 5))
    session, text, _ = chat(engine, ["Hi", "Bye"])
    assert text == "Hello [interrupted]\nok\n"
    assert session.conv.messages == history("Hi", "Hello", "Bye", "ok")
    # Cut short without a stop token: the next prompt closes the turn first.
    assert engine.text(engine.calls[1][0]).startswith("<|im_end|>\n<|im_start|>user\nBye")


def test_ctrl_c_before_the_reply_starts_drops_the_message_and_refeeds_history():
    engine = FakeEngine(["Hello!", "never", "Again!"], interrupt_at=(1, 0))
    session, text, _ = chat(engine, ["Hi", "Slow one", "Bye"])
    assert text == "Hello!\n\n[interrupted]\nAgain!\n"
    assert session.conv.messages == history("Hi", "Hello!", "Bye", "Again!")
    # The engine was cleared, so the whole history was fed again in one go.
    assert engine.text(engine.calls[2][0]) == session.conv.template.render(history("Hi", "Hello!", "Bye"))


# ----- the command line -----------------------------------------------------------------------

def test_main_bad_package_dir_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "atom_tvm.chat", str(tmp_path / "nope")],
                          capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: package directory ") and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_main_rejects_bad_settings_before_loading(capsys, tmp_path):
    assert main([str(tmp_path), "--temperature", "-2"]) == 2
    assert capsys.readouterr().err.startswith("error: bad value temperature=-2: must be >= 0")


def test_main_one_shot_prompt(monkeypatch, capsys, tmp_path):
    made = {}

    def chat_model(package_dir, device="cpu"):
        made["args"] = (package_dir, device)
        made["engine"] = FakeEngine(["Paris."], config={"conv_template": "chatml", "eos_token_id": IM_END,
                                                         "temperature": 0.0, "top_p": 1.0})
        return made["engine"]

    fake = types.ModuleType("atom_tvm.runtime.engine")
    fake.ChatModel, fake.GenerationConfig = chat_model, GenerationConfig
    monkeypatch.setitem(sys.modules, "atom_tvm.runtime.engine", fake)
    rc = main([str(tmp_path), "--device", "cuda", "--prompt", "Capital of France?", "--max-tokens", "32"])
    assert rc == 0
    assert capsys.readouterr().out == "Paris.\n"
    assert made["args"] == (str(tmp_path), "cuda")
    gen = made["engine"].calls[0][1]
    assert (gen.temperature, gen.top_p, gen.max_tokens) == (0.0, 1.0, 32)


def test_main_interactive_reads_until_eof(monkeypatch, capsys, tmp_path):
    engine = FakeEngine(["Hello!"], config={"conv_template": "chatml", "eos_token_id": IM_END})
    fake = types.ModuleType("atom_tvm.runtime.engine")
    fake.ChatModel, fake.GenerationConfig = (lambda package_dir, device="cpu": engine), GenerationConfig
    monkeypatch.setitem(sys.modules, "atom_tvm.runtime.engine", fake)
    monkeypatch.setattr("atom_tvm.chat._stdin_lines", lambda: iter(["", "Hi", "/bogus"]))
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"atom-tvm chat: {tmp_path.name} on cpu (template chatml, context 512 tokens)")
    assert out[1:] == ["empty prompt: type a message, or /help", "Hello!",
                       "unknown command '/bogus'; type /help for the list"]
