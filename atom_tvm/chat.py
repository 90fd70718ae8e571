"""Chat with a compiled package: ``python -m atom_tvm.chat dist/NAME``.

An interactive REPL with mlc_llm's commands (``/help``, ``/exit``, ``/stats``, ``/reset``,
``/set key=value;...``), or one answer with ``--prompt TEXT`` for scripts.

The REPL logic lives in :class:`ChatSession` / :func:`run_repl`, which take any object with the
``ChatModel`` interface of :mod:`atom_tvm.runtime.engine`, an iterable of input lines and an
output stream, so it can be driven without a model.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, TextIO

from atom_tvm.conversation import TEMPLATE_NAMES, Conversation, get_template
from atom_tvm.errors import UserError

HELP = """\
Commands:
  /help                  show this help
  /exit                  quit (Ctrl-D works too)
  /stats                 prefill and decode speed of the last reply
  /reset                 start a new conversation
  /set key=value;...     change sampling: temperature=0.7;top_p=0.95;max_tokens=256;seed=1
                         (seed=none for random); /set alone shows the current values
Anything else is sent to the model."""

SETTING_RULES = "valid keys: temperature (>= 0), top_p (0 < top_p <= 1), max_tokens (int >= 1), seed (int or none)"

EMPTY_PROMPT = "empty prompt: type a message, or /help"

_REPLACEMENT_CHAR = "\ufffd"


@dataclass(frozen=True)
class Settings:
    """Sampling settings the user controls; stop tokens come from the conversation template."""

    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 256
    seed: int | None = None

    def describe(self) -> str:
        seed = "none" if self.seed is None else self.seed
        return f"temperature={self.temperature:g} top_p={self.top_p:g} max_tokens={self.max_tokens} seed={seed}"


def _check_setting(key: str, raw) -> float | int | None:
    """``raw`` (a string from /set, or a number from the CLI/config) validated for ``key``.

    Raises UserError naming the key, the value and every valid key with its range.
    """
    def bad(why: str) -> UserError:
        return UserError(f"bad value {key}={raw}: {why}; {SETTING_RULES}")

    if key in ("temperature", "top_p"):
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise bad("not a number") from None
        if not math.isfinite(value):
            raise bad("not a finite number")
        if key == "temperature" and value < 0:
            raise bad("must be >= 0 (0 means greedy)")
        if key == "top_p" and not 0 < value <= 1:
            raise bad("must be in (0, 1]")
        return value
    if key in ("max_tokens", "seed"):
        if key == "seed" and (raw is None or str(raw).strip().lower() == "none"):
            return None
        try:
            # int("1.5") fails, as it should; an int from argparse passes through.
            value = int(str(raw).strip())
        except ValueError:
            raise bad("not an integer") from None
        if key == "max_tokens" and value < 1:
            raise bad("must be >= 1")
        return value
    raise UserError(f"unknown setting {key!r}; {SETTING_RULES}")


def parse_set(arg: str, current: Settings) -> Settings:
    """Apply ``/set`` arguments (``key=value`` separated by ``;``) to ``current``.

    All-or-nothing: one bad item raises UserError and nothing changes.
    """
    changes = {}
    for item in arg.split(";"):
        item = item.strip()
        if not item:
            continue  # tolerate "a=1;" and "a=1;;b=2"
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key:
            raise UserError(f"bad /set item {item!r}: expected key=value; {SETTING_RULES}")
        changes[key] = _check_setting(key, raw)
    if not changes:
        raise UserError(f"/set needs key=value items, e.g. /set temperature=0.5;top_p=0.9; {SETTING_RULES}")
    return replace(current, **changes)


def settings_from_config(chat_config: dict, overrides: dict) -> Settings:
    """Defaults from mlc-chat-config.json, then the command line's values (already checked)."""
    values = {}
    for key in ("temperature", "top_p", "max_tokens"):
        if chat_config.get(key) is not None:
            values[key] = _check_setting(key, chat_config[key])
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**values)


class _EngineRefused(UserError):
    """The engine rejected the prompt (it does not fit the context window) and did nothing."""


def _default_config_factory():
    # Imported late so the REPL logic (and its tests) does not need the compiled runtime.
    from atom_tvm.runtime.engine import GenerationConfig

    return GenerationConfig


class ChatSession:
    """One conversation between a user and an engine, printing to ``out``.

    ``config_factory`` builds the engine's GenerationConfig from keyword arguments (default:
    :class:`atom_tvm.runtime.engine.GenerationConfig`).
    """

    def __init__(self, engine, conv: Conversation, out: TextIO, settings: Settings | None = None,
                 config_factory: Callable | None = None):
        self.engine = engine
        self.conv = conv
        self.out = out
        self.settings = settings or Settings()
        self.config_factory = config_factory or _default_config_factory()
        self.tokenizer = engine.tokenizer
        self.stop_ids = frozenset(conv.template.stop_token_ids(self.tokenizer))
        self.text_stops = conv.template.text_stop_strs(self.tokenizer)
        self.has_reply = False  # /stats has something to report
        self._engine_was_reset = False  # set by _turn when it cleared the engine for a restart

    # ----- input dispatch -------------------------------------------------------------------

    def handle(self, line: str) -> bool:
        """Process one input line; False when the user asked to exit."""
        text = line.strip()
        if not text:
            self._say(EMPTY_PROMPT)
        elif text.startswith("/"):
            return self._command(text)
        else:
            try:
                self.send(text)
            except UserError as err:
                self._say(f"error: {err}")
            except KeyboardInterrupt:
                self._say("\n[interrupted]")
        return True

    def _command(self, text: str) -> bool:
        name, _, arg = text.partition(" ")
        if name == "/exit":
            return False
        if name == "/help":
            self._say(HELP)
        elif name == "/stats":
            self._say(self.stats_line())
        elif name == "/reset":
            self.reset()
            self._say("conversation reset")
        elif name == "/set":
            if not arg.strip():
                self._say(self.settings.describe())
            else:
                try:
                    self.settings = parse_set(arg, self.settings)
                    self._say(self.settings.describe())
                except UserError as err:
                    self._say(f"error: {err}")
        else:
            self._say(f"unknown command {name!r}; type /help for the list")
        return True

    def stats_line(self) -> str:
        if not self.has_reply:
            return "no stats yet: send a message first"
        s = self.engine.stats

        def rate(kind: str) -> str:
            tokens, seconds = s.get(f"{kind}_tokens", 0), s.get(f"{kind}_seconds", 0.0)
            speed = f"{tokens / seconds:.1f} tok/s" if seconds > 0 else "n/a tok/s"
            return f"{kind}: {speed} ({tokens} tokens, {seconds:.3f} s)"

        return f"{rate('prefill')}, {rate('decode')}"

    def reset(self) -> None:
        self.engine.reset()
        self.conv.reset()

    # ----- one turn ---------------------------------------------------------------------------

    def send(self, text: str) -> str:
        """Send one user message, stream the reply to ``out``, and return the reply text.

        Raises UserError when the message cannot be sent (e.g. too long for the context window);
        the conversation is then as it was before, so the next message works.
        """
        if not text.strip():
            raise UserError(EMPTY_PROMPT)
        before = self.conv.checkpoint()
        try:
            return self._send(text, before)
        except KeyboardInterrupt:
            # Ctrl-C before the reply started streaming (e.g. during prefill): what the engine
            # holds is unknown, so clear it; the history stays and is prefilled again next time.
            self.conv.rollback(before)
            self.engine.reset()
            self.conv.mark_engine_reset()
            raise

    def _send(self, text: str, before) -> str:
        had_history = self.conv.has_history
        self.conv.add_user(text)
        try:
            return self._turn()
        except UserError as err:
            self._undo_turn(before)
            if not (isinstance(err, _EngineRefused) and had_history and self._fits_alone(text)):
                raise
            # The history plus this message overflow the window, but the message alone fits:
            # say so and start over with it, as /reset and resending would.
            self._say(f"[context window full: {err}; starting a new conversation with your message]")
            self.reset()
            fresh = self.conv.checkpoint()
            self.conv.add_user(text)
            try:
                return self._turn()
            except UserError:
                self._undo_turn(fresh)
                raise

    def _undo_turn(self, cp) -> None:
        self.conv.rollback(cp)
        if self._engine_was_reset:
            # The engine was cleared for a restart and then refused the prompt: it holds nothing.
            self.conv.mark_engine_reset()

    def _encode(self, text: str) -> list[int]:
        # The template wrote any BOS itself; letting the tokenizer add one would double it.
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def _fits_alone(self, text: str) -> bool:
        probe = Conversation(self.conv.template, self.conv.system_message)
        probe.add_user(text)
        return len(self._encode(probe.prompt_delta().text)) < self.engine.context_window_size

    def _turn(self) -> str:
        """Feed the prompt delta, stream the reply, record it. UserError: nothing was generated."""
        self._engine_was_reset = False
        delta = self.conv.prompt_delta()
        ids = self._encode(delta.text)
        if delta.restart:
            self.engine.reset()
            self._engine_was_reset = True
        config = self.config_factory(
            temperature=self.settings.temperature, top_p=self.settings.top_p,
            max_tokens=self.settings.max_tokens, seed=self.settings.seed,
            stop_token_ids=tuple(sorted(self.stop_ids)),
        )
        try:
            tokens = iter(self.engine.generate(ids, config))
            # An engine written as a generator function raises only on the first next().
            first = next(tokens, None)
        except UserError as err:
            raise _EngineRefused(str(err)) from None
        try:
            reply, stop_text, ended = self._stream(first, tokens)
        except UserError:
            # Not part of the engine's contract mid-reply; its sequence is unknown now, so clear
            # it. The history stays and is prefilled again with the next message.
            self.engine.reset()
            self._engine_was_reset = True
            raise
        self.has_reply = True
        self.conv.add_assistant(reply, stop_text)
        if ended == "context":
            self._say("[context window full: the conversation was reset; your next message starts a new one]")
            self.reset()
        return reply

    def _stream(self, first: int | None, tokens) -> tuple[str, str, str]:
        """Print the reply as it arrives; returns (reply text, stop marker text, why it ended).

        Why it ended: "stop" (stop token or string), "length" (max_tokens), "interrupted"
        (Ctrl-C) or "context" (the engine stopped for none of those: the window is full).

        Tokens are decoded together (a character may span several byte tokens, and tokenizers
        join pieces context-dependently), and only the new suffix is printed; text ending in an
        incomplete character (U+FFFD) or in what may be the start of a stop string is held back.
        """
        reply_ids: list[int] = []
        text, printed, stop_text, yielded = "", 0, "", 0
        ended = None
        try:
            tok = first
            while tok is not None:
                yielded += 1
                if tok in self.stop_ids:
                    stop_text, ended = self.tokenizer.decode([tok], skip_special_tokens=False), "stop"
                    break
                reply_ids.append(tok)
                text = self.tokenizer.decode(reply_ids, skip_special_tokens=True)
                cut = self._find_text_stop(text)
                if cut is not None:
                    text, stop_text, ended = text[:cut[0]], cut[1], "stop"
                    break
                shown = text[:len(text) - self._holdback(text)]
                if len(shown) > printed:
                    self._write(shown[printed:])
                    printed = len(shown)
                tok = next(tokens, None)
        except KeyboardInterrupt:
            ended = "interrupted"  # Ctrl-C ends this reply, not the program
        finally:
            close = getattr(tokens, "close", None)
            if close is not None:
                close()  # we may stop before the engine does (stop string, Ctrl-C)
        if ended is None:
            ended = "length" if yielded >= self.settings.max_tokens else "context"
        self._write(text[printed:] + (" [interrupted]" if ended == "interrupted" else "") + "\n")
        return text, stop_text, ended

    def _find_text_stop(self, text: str) -> tuple[int, str] | None:
        hits = [(text.find(s), s) for s in self.text_stops if s in text]
        return min(hits) if hits else None

    def _holdback(self, text: str) -> int:
        """How many trailing characters of ``text`` must not be printed yet."""
        n = len(text) - len(text.rstrip(_REPLACEMENT_CHAR))
        if n:
            return n
        for stop in self.text_stops:
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    n = max(n, k)
                    break
        return n

    # ----- output -----------------------------------------------------------------------------

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()  # streaming: show each piece as soon as it exists

    def _say(self, line: str) -> None:
        self._write(line + "\n")


def run_repl(engine, conv: Conversation, lines: Iterable[str], out: TextIO,
             settings: Settings | None = None, config_factory: Callable | None = None) -> ChatSession:
    """Run the chat REPL over ``lines`` (user input, one message or command each) until they end
    or ``/exit``; returns the session for inspection."""
    session = ChatSession(engine, conv, out, settings, config_factory)
    for line in lines:
        if not session.handle(line):
            break
    return session


def _stdin_lines(prompt: str = ">>> "):
    """Lines typed at the terminal; ends quietly on Ctrl-D (EOF) or Ctrl-C at the prompt."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    while True:
        try:
            yield input(prompt)
        except (EOFError, KeyboardInterrupt):
            print()
            return


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m atom_tvm.chat", description="Chat with a compiled atom-tvm package.")
    p.add_argument("package", help="package directory, e.g. dist/NAME")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--conv-template", default=None,
                   help=f"conversation template: {', '.join(TEMPLATE_NAMES)} (default: the package's)")
    p.add_argument("--prompt", default=None, help="answer this one message and exit")
    p.add_argument("--temperature", default=None, help="sampling temperature, >= 0 (0: greedy)")
    p.add_argument("--top-p", default=None, help="nucleus sampling mass, 0 < p <= 1")
    p.add_argument("--max-tokens", default=None, help="most tokens per reply, >= 1")
    p.add_argument("--seed", default=None, help="sampling seed (int)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # Cheap checks first, before spending seconds loading a model.
        overrides = {key: _check_setting(key, getattr(args, key))
                     for key in ("temperature", "top_p", "max_tokens", "seed")
                     if getattr(args, key) is not None}
        if args.prompt is not None and not args.prompt.strip():
            raise UserError("empty --prompt: give the message text")
        if not Path(args.package).is_dir():
            raise UserError(f"package directory {args.package} does not exist "
                            "(expected a compiled package such as dist/NAME)")
        from atom_tvm.runtime.engine import ChatModel, GenerationConfig

        engine = ChatModel(args.package, device=args.device)
        template = get_template(args.conv_template, engine.config, engine.tokenizer)
        conv = Conversation(template, system_message=engine.config.get("system_message"))
        settings = settings_from_config(engine.config, overrides)
        session = ChatSession(engine, conv, sys.stdout, settings, GenerationConfig)
        if args.prompt is not None:
            session.send(args.prompt)
            return 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130  # the shell's convention for SIGINT

    print(f"atom-tvm chat: {Path(args.package).name} on {args.device} "
          f"(template {template.name}, context {engine.context_window_size} tokens). /help for commands.")
    for line in _stdin_lines():
        if not session.handle(line):
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
