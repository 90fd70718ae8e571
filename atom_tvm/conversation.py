"""Conversation templates: turn a chat history into the prompt text a model was trained on.

Four templates are available, picked by name (mlc-chat-config.json's ``conv_template``, or
``--conv-template``):

* ``llama-2``  ``<s>[INST] <<SYS>>\\n...\\n<</SYS>>\\n\\nuser [/INST] reply </s><s>[INST] ...``
* ``llama-3``  ``<|begin_of_text|><|start_header_id|>role<|end_header_id|>\\n\\n...<|eot_id|>``
* ``chatml``   ``<|im_start|>role\\n...<|im_end|>\\n``
* ``model``    the model's own Jinja ``chat_template`` (from tokenizer_config.json), rendered the way
               transformers' ``apply_chat_template`` does, in a sandbox.

Every template writes its own BOS marker (or none) into the text, so the prompt must be tokenized
with ``add_special_tokens=False``; that is how BOS is never added twice.

:class:`Conversation` keeps the history and hands out only the part of the prompt the engine has
not seen yet (:meth:`Conversation.prompt_delta`), so a multi-turn chat reuses the KV cache instead
of prefilling the whole history every turn.
"""

from __future__ import annotations

import abc
import copy
import json
from dataclasses import dataclass, field
from datetime import datetime

from atom_tvm.errors import UserError

ROLES = ("system", "user", "assistant")

# Markers that end an assistant turn in common chat formats. For a ``model`` template, the ones
# that occur literally in its Jinja source become stop strings (its EOS ids come from the config).
_KNOWN_TURN_ENDS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")

# Stand-in content for the last assistant reply while working out the prompt delta (see
# Conversation.prompt_delta). No whitespace at either end, so templates that strip/trim content
# keep it intact, and nothing a template would treat specially.
_REPLY_SENTINEL = "<<atom-tvm-reply-3f9c1a>>"


class ChatTemplate(abc.ABC):
    """Base class: renders a list of ``{"role", "content"}`` messages into prompt text.

    ``stop_strs`` are the texts that end an assistant turn; ``eos_token_ids`` are the config's EOS
    ids, which always stop generation too. Subclasses implement :meth:`_render`.
    """

    name = "?"

    def __init__(self, stop_strs: tuple[str, ...] = (), eos_token_ids: tuple[int, ...] = ()):
        self.stop_strs = tuple(stop_strs)
        self.eos_token_ids = tuple(eos_token_ids)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages``, ending with the assistant header when asked."""
        _check_messages(messages)
        return self._render(messages, add_generation_prompt)

    @abc.abstractmethod
    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The template's text for already checked messages."""

    def stop_token_ids(self, tokenizer) -> tuple[int, ...]:
        """Token ids that end a reply: the config's EOS ids plus stop strings that are one token."""
        ids = list(self.eos_token_ids)
        for text in self.stop_strs:
            tid = tokenizer.token_to_id(text)
            if tid is not None and tid not in ids:
                ids.append(tid)
        return tuple(ids)

    def text_stop_strs(self, tokenizer) -> tuple[str, ...]:
        """Stop strings the tokenizer has no single token for: these must be matched in the text."""
        return tuple(s for s in self.stop_strs if tokenizer.token_to_id(s) is None)


def _check_messages(messages: list[dict]) -> None:
    # Built-in formats only know these three roles, and put the system prompt first; a bad history
    # is a caller bug, but it reaches users through --prompt files etc., so say what is wrong.
    for i, msg in enumerate(messages):
        role = msg.get("role")
        if role not in ROLES:
            raise UserError(f"message {i} has role {role!r}; roles are {', '.join(ROLES)}")
        if role == "system" and i != 0:
            raise UserError(f"message {i} is a system message; only the first message may be one")
        if not isinstance(msg.get("content"), str):
            raise UserError(f"message {i} ({role}) has no text content")


def _split_system(messages: list[dict]) -> tuple[str | None, list[dict]]:
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return None, messages


class Llama2Template(ChatTemplate):
    """Meta's Llama-2-chat format, as its tokenizer_config.json chat_template writes it."""

    name = "llama-2"

    def __init__(self, eos_token_ids: tuple[int, ...] = ()):
        super().__init__(stop_strs=("</s>",), eos_token_ids=eos_token_ids)

    def _render(self, messages, add_generation_prompt):
        system, rest = _split_system(messages)
        parts = []
        for i, msg in enumerate(rest):
            content = msg["content"]
            if i == 0 and system is not None:
                # Llama-2 has no system turn: the system prompt rides inside the first [INST].
                content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
            if msg["role"] == "user":
                parts.append(f"<s>[INST] {content.strip()} [/INST]")
            else:
                parts.append(f" {content.strip()} </s>")
        # The reply follows "[/INST]" directly: there is no separate assistant header to add.
        return "".join(parts)


class Llama3Template(ChatTemplate):
    """Meta's Llama-3 instruct format (headers, ``<|eot_id|>`` after every turn)."""

    name = "llama-3"

    def __init__(self, eos_token_ids: tuple[int, ...] = ()):
        super().__init__(stop_strs=("<|eot_id|>", "<|end_of_text|>"), eos_token_ids=eos_token_ids)

    def _render(self, messages, add_generation_prompt):
        parts = ["<|begin_of_text|>"]
        for msg in messages:
            parts.append(f"<|start_header_id|>{msg['role']}<|end_header_id|>\n\n{msg['content'].strip()}<|eot_id|>")
        if add_generation_prompt:
            parts.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
        return "".join(parts)


class ChatMLTemplate(ChatTemplate):
    """ChatML (Qwen, SmolLM, many fine-tunes); it has no BOS marker."""

    name = "chatml"

    def __init__(self, eos_token_ids: tuple[int, ...] = ()):
        super().__init__(stop_strs=("<|im_end|>",), eos_token_ids=eos_token_ids)

    def _render(self, messages, add_generation_prompt):
        parts = [f"<|im_start|>{msg['role']}\n{msg['content']}<|im_end|>\n" for msg in messages]
        if add_generation_prompt:
            parts.append("<|im_start|>assistant\n")
        return "".join(parts)


class JinjaTemplate(ChatTemplate):
    """The model's own ``chat_template``, rendered like transformers' ``apply_chat_template``.

    The template comes from a downloaded model, so it runs in jinja2's immutable sandbox: it can
    format strings but not reach Python objects or mutate the messages it is given.
    """

    name = "model"

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "",
                 eos_token_ids: tuple[int, ...] = ()):
        stops = tuple(m for m in _KNOWN_TURN_ENDS if m in source)
        if eos_token and eos_token not in stops:
            stops += (eos_token,)
        super().__init__(stop_strs=stops, eos_token_ids=eos_token_ids)
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._template = _compile_jinja(source)

    def _render(self, messages, add_generation_prompt):
        import jinja2

        try:
            return self._template.render(
                # Plain copies: the sandbox forbids mutation anyway, but the history is ours.
                messages=copy.deepcopy(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                # transformers passes these explicitly; templates test `tools is not none`, which an
                # undefined variable would pass.
                tools=None,
                documents=None,
            )
        except jinja2.TemplateError as err:
            raise UserError(f"the model's chat_template failed: {err}") from None


def _compile_jinja(source: str):
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        # transformers marks assistant text with {% generation %}...{% endgeneration %} for training
        # masks; for inference it is just its body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(value, indent=None, separators=None, sort_keys=False):
        # Unlike jinja's own tojson, no HTML escaping: the output is a prompt, not a web page.
        return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    # trim_blocks/lstrip_blocks match transformers, which the templates' whitespace is written for.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise UserError(f"the model's chat_template does not parse (line {err.lineno}): {err.message}") from None


TEMPLATE_NAMES = ("llama-2", "llama-3", "chatml", "model")
_BUILTIN = {"llama-2": Llama2Template, "llama-3": Llama3Template, "chatml": ChatMLTemplate}


def _as_id_tuple(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def get_template(name: str | None, chat_config: dict, tokenizer=None) -> ChatTemplate:
    """The template called ``name`` (``None``: the config's ``conv_template``).

    ``tokenizer`` (a ``tokenizers.Tokenizer``) supplies the BOS/EOS token strings a ``model``
    template may print; without it they come from the config's ``bos_token``/``eos_token``.
    """
    if name is None:
        name = chat_config.get("conv_template") or ("model" if chat_config.get("chat_template") else None)
        if name is None:
            raise UserError("mlc-chat-config.json names no conv_template; pass --conv-template "
                            f"({', '.join(TEMPLATE_NAMES)})")
    eos_ids = _as_id_tuple(chat_config.get("eos_token_id"))
    if name in _BUILTIN:
        return _BUILTIN[name](eos_token_ids=eos_ids)
    if name != "model":
        raise UserError(f"unknown conversation template {name!r}; valid names: {', '.join(TEMPLATE_NAMES)}")
    source = chat_config.get("chat_template")
    if not source:
        raise UserError("conversation template 'model' needs the model's chat_template, and "
                        "mlc-chat-config.json has none; pick one of "
                        f"{', '.join(n for n in TEMPLATE_NAMES if n != 'model')} with --conv-template")
    return JinjaTemplate(source,
                         bos_token=_token_text(chat_config, "bos", tokenizer),
                         eos_token=_token_text(chat_config, "eos", tokenizer),
                         eos_token_ids=eos_ids)


def _token_text(chat_config: dict, which: str, tokenizer) -> str:
    ids = _as_id_tuple(chat_config.get(f"{which}_token_id"))
    if tokenizer is not None and ids:
        text = tokenizer.id_to_token(ids[0])
        if text is not None:
            return text
    return chat_config.get(f"{which}_token") or ""


@dataclass(frozen=True)
class PromptDelta:
    """Text to feed the engine next. ``restart``: reset the engine first and feed ``text`` alone,
    because what the engine holds is no longer a prefix of the conversation's prompt."""

    text: str
    restart: bool


@dataclass(frozen=True)
class _LastReply:
    index: int        # position of the assistant message in the history
    fed_before: str   # prompt text the engine held when the reply started
    stop_text: str    # text of the stop marker the engine produced at its end ("" if none)


@dataclass(frozen=True)
class Checkpoint:
    """Saved conversation state for :meth:`Conversation.rollback`."""

    messages: tuple
    fed: str
    last_reply: _LastReply | None


@dataclass
class Conversation:
    """A chat history plus what part of its prompt the engine has already been fed.

    Usage per turn::

        conv.add_user(text)
        delta = conv.prompt_delta()           # text the engine has not seen (or restart)
        ... engine.generate(tokenize(delta.text)) ...
        conv.add_assistant(reply, stop_text)  # what the model said, and its stop marker text

    The engine's sequence is assumed to be everything fed plus every token it yielded, the
    final stop token included.
    """

    template: ChatTemplate
    system_message: str | None = None
    messages: list[dict] = field(default_factory=list)
    # Prompt text the engine's sequence stands for, and the reply added since the last delta.
    _fed: str = field(default="", init=False, repr=False)
    _last_reply: _LastReply | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if not self.messages and self.system_message:
            self.messages.append({"role": "system", "content": self.system_message})

    def add_user(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})

    def add_assistant(self, text: str, stop_text: str = "") -> None:
        """Record the model's reply.

        ``text`` is the reply as shown (no stop marker); ``stop_text`` is the text of the stop
        token or string the engine produced after it, or "" when the reply was cut short
        (max_tokens), in which case the template's end-of-turn marker still has to be fed.
        """
        self._last_reply = _LastReply(len(self.messages), self._fed, stop_text)
        self.messages.append({"role": "assistant", "content": text})

    @property
    def has_history(self) -> bool:
        """Whether any user/assistant turn has been added (a system message alone is not one)."""
        return any(m["role"] != "system" for m in self.messages)

    def prompt_delta(self) -> PromptDelta:
        """The prompt text to feed next, and records it as fed.

        The whole history is rendered (with the assistant header) and compared with what was
        already fed. The model's own last reply is the tricky part: the engine holds the tokens
        the model generated, and the template would re-render that reply with its own spacing
        and end-of-turn marker. So the last reply is rendered as a sentinel; everything before
        it must match what was fed before the reply, and what comes after it (less the stop
        marker the model already produced) is the delta. Any other mismatch (a template whose
        earlier text depends on later messages, an edited history) asks for a restart.
        """
        full = self.template.render(self.messages, add_generation_prompt=True)
        delta = self._delta_after_reply() if self._last_reply is not None else None
        if delta is None:
            if full.startswith(self._fed):
                delta = PromptDelta(full[len(self._fed):], restart=False)
            else:
                delta = PromptDelta(full, restart=True)
        self._fed = full
        self._last_reply = None
        return delta

    def _delta_after_reply(self) -> PromptDelta | None:
        reply = self._last_reply
        if reply.index >= len(self.messages) or self.messages[reply.index]["role"] != "assistant":
            return None
        marked = copy.deepcopy(self.messages)
        marked[reply.index]["content"] = _REPLY_SENTINEL
        text = self.template.render(marked, add_generation_prompt=True)
        head, sep, tail = text.partition(_REPLY_SENTINEL)
        if not sep or not head.startswith(reply.fed_before) or _REPLY_SENTINEL in tail:
            return None
        # Text between the fed prompt and the reply (e.g. a header the template adds only once
        # the reply exists) cannot be inserted into the KV cache after the fact.
        if head[len(reply.fed_before):].strip():
            return None
        stripped = tail.lstrip()
        if reply.stop_text and stripped.startswith(reply.stop_text):
            # The model already produced the end-of-turn marker; whitespace the template puts
            # before it (llama-2's " </s>") was never generated, so skip it too.
            tail = stripped[len(reply.stop_text):]
        return PromptDelta(tail, restart=False)

    def checkpoint(self) -> Checkpoint:
        return Checkpoint(tuple(copy.deepcopy(self.messages)), self._fed, self._last_reply)

    def rollback(self, cp: Checkpoint) -> None:
        """Back to ``cp``: for a turn the engine refused, so it still holds what it held then."""
        self.messages = list(copy.deepcopy(cp.messages))
        self._fed = cp.fed
        self._last_reply = cp.last_reply

    def mark_engine_reset(self) -> None:
        """The engine's sequence was cleared: the next delta is the whole prompt."""
        self._fed = ""
        self._last_reply = None

    def reset(self) -> None:
        """Forget the history (keeping the system message); pair with ``engine.reset()``."""
        self.messages = []
        self.__post_init__()
        self.mark_engine_reset()

