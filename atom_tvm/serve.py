"""OpenAI-compatible HTTP server over the continuous-batching engine: ``python -m atom_tvm.serve dist/NAME``.

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (``"stream": true`` for
server-sent events, ending with ``data: [DONE]``), ``GET /v1/models``, ``GET /health`` and
``GET /metrics`` (Prometheus text format).

The HTTP side is aiohttp on one asyncio event loop; the engine steps in its own thread. A request
is checked on the loop, tokenized in a worker thread (so a huge prompt does not stall the other
clients), submitted to the engine, and its outputs come back through
``loop.call_soon_threadsafe`` into a per-request queue. A client that disconnects has its request
cancelled, which frees its KV pages before the next step. Every error is a JSON body in OpenAI's
shape, ``{"error": {"message", "type", "param", "code"}}``, with a 4xx status for bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import math
import signal
import sys
import time
import uuid
from pathlib import Path

from aiohttp import web

from atom_tvm.conversation import get_template
from atom_tvm.errors import UserError
from atom_tvm.runtime.batching import STEP_SECONDS_BUCKETS, Engine, RequestOutput, SamplingParams

log = logging.getLogger("atom_tvm.serve")

#: Largest request body accepted; a bigger one gets 413 before it is read.
MAX_BODY_BYTES = 32 * 2**20
#: Default KV budget ceiling when --kv-budget is not given.
DEFAULT_KV_BYTES = 2**30
MAX_STOP_STRINGS = 16
_SIZE_UNITS = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9}


class ApiError(Exception):
    """An error answered as OpenAI's JSON error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status)


# ----- request fields ---------------------------------------------------------------------------

def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _optional(body: dict, name: str, check, what: str, default=None):
    """``body[name]`` if present and not null, after ``check``; a 400 naming the field otherwise."""
    value = body.get(name)
    if value is None:
        return default
    if not check(value):
        raise ApiError(400, f"'{name}' must be {what}, got {json.dumps(value)[:80]}", param=name)
    return value


def _stop_strings(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not (isinstance(stops, list) and all(isinstance(s, str) and s for s in stops)
            and len(stops) <= MAX_STOP_STRINGS):
        raise ApiError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them",
                       param="stop")
    return tuple(stops)


def _check_unsupported(body: dict) -> None:
    if body.get("n") not in (None, 1):
        raise ApiError(400, "'n' must be 1: one choice per request is supported", param="n")
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs") is not None:
        raise ApiError(400, "'logprobs' is not supported", param="logprobs")


# ----- the server -------------------------------------------------------------------------------

class Server:
    """The aiohttp application around one engine serving one model."""

    def __init__(self, engine: Engine, model_name: str, chat_config: dict):
        self.engine, self.model_name = engine, model_name
        self.tokenizer = engine.tokenizer
        self.template = get_template(None, chat_config, self.tokenizer)
        self.chat_stop_ids = tuple(self.template.stop_token_ids(self.tokenizer))
        self.chat_stop_strs = tuple(self.template.text_stop_strs(self.tokenizer))
        self.default_max_tokens = int(chat_config.get("max_tokens") or 256)
        self.defaults = {key: float(chat_config[key]) for key in ("temperature", "top_p")
                         if chat_config.get(key) is not None}
        self.created = int(time.time())
        self.http_responses: dict[int, int] = {}

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._errors])
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
        """Every failure becomes a JSON error; the server itself keeps running."""
        try:
            response = await handler(request)
        except ApiError as err:
            response = err.response()
        except web.HTTPException as err:
            if err.status < 400:
                raise
            messages = {404: f"no such endpoint: {request.method} {request.path}",
                        405: f"method {request.method} is not allowed on {request.path}",
                        413: f"request body too large: at most {MAX_BODY_BYTES} bytes"}
            response = ApiError(err.status, messages.get(err.status, err.reason)).response()
        except Exception:
            log.exception("unexpected error handling %s %s", request.method, request.path)
            response = ApiError(500, "internal server error; see the server log").response()
        self.http_responses[response.status] = self.http_responses.get(response.status, 0) + 1
        return response

    # ----- simple endpoints -----------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "atom-tvm",
             "max_model_len": self.engine.context_window_size}]})

    async def health(self, request: web.Request) -> web.Response:
        if not self.engine.is_alive:
            raise ApiError(503, "the engine thread is not running")
        return web.json_response({"status": "ok"})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=prometheus_text(self.engine.metrics(), self.http_responses),
                            content_type="text/plain", charset="utf-8",
                            headers={"X-Prometheus-Format": "0.0.4"})

    # ----- completions ----------------------------------------------------------------------

    async def _body(self, request: web.Request) -> dict:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ApiError(400, f"request body is not valid JSON: {err}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise ApiError(404, f"model '{str(model)[:80]}' is not served here; this server has "
                                f"'{self.model_name}' (GET /v1/models)", param="model", code="model_not_found")
        _check_unsupported(body)
        return body

    def _params(self, body: dict, prompt_len: int, max_tokens_key: str, stop_ids=(), stop_strs=()) -> SamplingParams:
        temperature = _optional(body, "temperature", lambda v: _is_number(v) and 0 <= v <= 2, "a number in [0, 2]",
                                self.defaults.get("temperature", 1.0))
        top_p = _optional(body, "top_p", lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]",
                          self.defaults.get("top_p", 1.0))
        seed = _optional(body, "seed", _is_int, "an integer")
        room = self.engine.max_request_tokens - prompt_len
        max_tokens = None
        for key in (max_tokens_key, "max_tokens"):
            max_tokens = _optional(body, key, lambda v: _is_int(v) and v >= 1, "an integer >= 1")
            if max_tokens is not None:
                break
        if max_tokens is None:
            max_tokens = max(1, min(self.default_max_tokens, room))  # a too-long prompt is reported by the engine
        return SamplingParams(temperature=float(temperature), top_p=float(top_p), max_tokens=max_tokens, seed=seed,
                              stop_token_ids=tuple(stop_ids), stop=tuple(stop_strs) + _stop_strings(body))

    async def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        loop = asyncio.get_running_loop()
        encode = functools.partial(self.tokenizer.encode, text, add_special_tokens=add_special_tokens)
        encoding = await loop.run_in_executor(None, encode)
        return encoding.ids

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            ids = await self._encode(prompt, add_special_tokens=True)
        elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
            ids = prompt
        else:
            raise ApiError(400, "'prompt' must be a string or a non-empty list of token ids (one prompt per request)",
                           param="prompt")
        params = self._params(body, len(ids), "max_tokens")
        return await self._respond(request, body, ids, params, "text_completion", f"cmpl-{uuid.uuid4().hex}")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        messages = body.get("messages")
        if not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)):
            raise ApiError(400, "'messages' must be a non-empty list of {\"role\", \"content\"} objects",
                           param="messages")
        try:
            text = self.template.render([{"role": m.get("role"), "content": _message_text(m)} for m in messages],
                                        add_generation_prompt=True)
        except UserError as err:
            raise ApiError(400, str(err), param="messages") from None
        ids = await self._encode(text, add_special_tokens=False)  # the template wrote any BOS itself
        params = self._params(body, len(ids), "max_completion_tokens", self.chat_stop_ids, self.chat_stop_strs)
        return await self._respond(request, body, ids, params, "chat.completion", f"chatcmpl-{uuid.uuid4().hex}")

    async def _respond(self, request: web.Request, body: dict, ids: list[int], params: SamplingParams, kind: str,
                       response_id: str) -> web.StreamResponse:
        stream = _optional(body, "stream", lambda v: isinstance(v, bool), "true or false", False)
        options = _optional(body, "stream_options", lambda v: isinstance(v, dict), "an object", {})
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        try:
            handle = self.engine.submit(ids, params, on_output=lambda out: loop.call_soon_threadsafe(
                outputs.put_nowait, out))
        except UserError as err:
            raise ApiError(400, str(err)) from None
        reply = _Reply(kind, response_id, self.model_name, len(ids))
        try:
            if stream:
                return await self._stream(request, outputs, reply, bool(options.get("include_usage")))
            return await self._collect(outputs, reply)
        finally:
            if not reply.finished:  # the client went away: its handler was cancelled, or a write failed
                handle.cancel()

    async def _collect(self, outputs: asyncio.Queue, reply: "_Reply") -> web.Response:
        text = []
        while not reply.finished:
            out = await outputs.get()
            text.append(out.text)
            reply.finished = out.finish_reason is not None
        if out.finish_reason == "error":
            raise ApiError(500, out.error or "generation failed")
        return web.json_response(reply.whole("".join(text), out))

    async def _stream(self, request: web.Request, outputs: asyncio.Queue, reply: "_Reply",
                      include_usage: bool) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)

        async def send(payload) -> None:
            await response.write(b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n")

        try:
            if reply.kind == "chat.completion":
                await send(reply.chunk({"role": "assistant", "content": ""}, None))
            while not reply.finished:
                out = await outputs.get()
                reply.finished = out.finish_reason is not None
                if out.finish_reason == "error":
                    await send(ApiError(500, out.error or "generation failed").body())
                    break
                if out.text or reply.finished:
                    await send(reply.chunk(out.text, out.finish_reason))
                if reply.finished and include_usage:
                    await send(reply.usage_chunk(out))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionResetError:  # the client closed the stream; _respond cancels the request
            pass
        return response


def _message_text(message: dict):
    """A message's content as text: a string, or OpenAI's list of text parts joined."""
    content = message.get("content")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    return content  # anything else is reported by the template's message check


class _Reply:
    """OpenAI's response objects for one completion or chat completion."""

    def __init__(self, kind: str, response_id: str, model: str, num_prompt_tokens: int):
        self.kind, self.id, self.model, self.num_prompt_tokens = kind, response_id, model, num_prompt_tokens
        self.created = int(time.time())
        self.finished = False  # the engine's last output for the request has arrived

    def _head(self, suffix: str = "") -> dict:
        return {"id": self.id, "object": self.kind + suffix, "created": self.created, "model": self.model}

    def _usage(self, out: RequestOutput) -> dict:
        return {"prompt_tokens": self.num_prompt_tokens, "completion_tokens": out.num_generated_tokens,
                "total_tokens": self.num_prompt_tokens + out.num_generated_tokens}

    def whole(self, text: str, out: RequestOutput) -> dict:
        if self.kind == "chat.completion":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": out.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": out.finish_reason}
        return {**self._head(), "choices": [choice], "usage": self._usage(out)}

    def chunk(self, delta, finish_reason: str | None) -> dict:
        if self.kind == "chat.completion":
            content = delta if isinstance(delta, dict) else ({"content": delta} if delta else {})
            choice = {"index": 0, "delta": content, "logprobs": None, "finish_reason": finish_reason}
            return {**self._head(".chunk"), "choices": [choice]}
        return {**self._head(), "choices": [{"index": 0, "text": delta, "logprobs": None,
                                             "finish_reason": finish_reason}]}

    def usage_chunk(self, out: RequestOutput) -> dict:
        return {**self._head(".chunk" if self.kind == "chat.completion" else ""), "choices": [],
                "usage": self._usage(out)}


# ----- metrics ----------------------------------------------------------------------------------

_COUNTERS = (
    ("requests_submitted", "Requests the engine accepted."),
    ("requests_rejected", "Requests the engine refused (they can never run)."),
    ("prompt_tokens", "Prompt tokens of accepted requests."),
    ("prefill_tokens", "Tokens fed as prompt, recomputation after preemption included."),
    ("generated_tokens", "Tokens generated."),
    ("preemptions", "Requests preempted to free KV pages (recomputed later)."),
)
_GAUGES = (
    ("waiting", "requests_waiting", "Requests queued, not yet running."),
    ("running", "requests_running", "Requests holding a KV sequence."),
    ("batch_size", "batch_size", "Sequences in the last step."),
    ("kv_pages_used", "kv_pages_used", "KV cache pages in use."),
    ("kv_pages_total", "kv_pages_total", "KV cache pages in all."),
    ("kv_page_size", "kv_page_size", "Tokens per KV cache page."),
    ("max_batch", "max_batch", "Most sequences per step."),
)


def prometheus_text(m: dict, http_responses: dict[int, int]) -> str:
    """The engine's metrics (and HTTP response counts) in Prometheus' text exposition format."""
    lines = []

    def metric(name: str, kind: str, help_text: str, samples) -> None:
        lines.extend([f"# HELP atom_tvm_{name} {help_text}", f"# TYPE atom_tvm_{name} {kind}"])
        lines.extend(f"atom_tvm_{name}{labels} {value}" for labels, value in samples)

    for key, help_text in _COUNTERS:
        metric(f"{key}_total", "counter", help_text, [("", m[key])])
    metric("requests_finished_total", "counter", "Finished requests by reason.",
           [(f'{{reason="{reason}"}}', count) for reason, count in sorted(m["finished"].items())])
    metric("steps_total", "counter", "Engine steps that ran a forward, by what they fed: decode tokens only, "
           "prompt tokens only, or both (chunked prefill mixed with decode).",
           [(f'{{kind="{kind}"}}', count) for kind, count in sorted(m["steps_by_kind"].items())])
    metric("http_responses_total", "counter", "HTTP responses by status code.",
           [(f'{{code="{code}"}}', count) for code, count in sorted(http_responses.items())])
    for key, name, help_text in _GAUGES:
        metric(name, "gauge", help_text, [("", m[key])])
    metric("step_seconds", "histogram", "Wall time of engine steps (schedule, forward, sampling).", [])
    bounds = [str(b) for b in STEP_SECONDS_BUCKETS] + ["+Inf"]
    lines.extend(f'atom_tvm_step_seconds_bucket{{le="{bound}"}} {count}'
                 for bound, count in zip(bounds, [*m["step_seconds_buckets"], m["steps"]]))
    lines.append(f"atom_tvm_step_seconds_sum {m['step_seconds_sum']}")
    lines.append(f"atom_tvm_step_seconds_count {m['steps']}")
    return "\n".join(lines) + "\n"


# ----- command line -----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m atom_tvm.serve", description=__doc__.split("\n")[0])
    p.add_argument("package", help="package directory, e.g. dist/NAME")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000; 0 picks a free one)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--max-batch", type=int, default=32, help="most sequences per step (default: 32)")
    p.add_argument("--kv-budget", default=None,
                   help="KV cache size: tokens (e.g. 16384) or bytes (e.g. 512MiB, 20GiB); default: max-batch full "
                        "context windows, at most 1 GiB")
    p.add_argument("--model-name", default=None,
                   help="the model id clients send (default: the package's directory name)")
    return p


def parse_kv_budget(text: str) -> tuple[str, int]:
    """``--kv-budget``: "4096" (tokens) or a size such as "512MiB", "2GiB", "1.5GB" (bytes).
    Returns ("tokens" | "bytes", amount)."""
    raw = str(text).strip().lower().replace(" ", "")
    unit = next((u for u in sorted(_SIZE_UNITS, key=len, reverse=True) if raw.endswith(u)), None)
    try:
        value = int(raw) if unit is None else int(float(raw[:-len(unit)]) * _SIZE_UNITS[unit])
    except (ValueError, OverflowError):
        value = -1
    if value < 1:
        raise UserError(f"--kv-budget {text!r}: give tokens (e.g. 8192) or a size (e.g. 512MiB, 2GiB)")
    return ("tokens" if unit is None else "bytes"), value


async def _serve(server: Server, host: str, port: int) -> None:
    # handler_cancellation: a client that disconnects cancels its handler, which cancels its request.
    runner = web.AppRunner(server.app(), handler_cancellation=True, access_log=None, shutdown_timeout=5)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    print(f"atom-tvm serve: '{server.model_name}' on http://{host}:{bound} (max batch {server.engine.max_batch}, "
          f"KV cache {server.engine.kv_pages_total} pages of {server.engine.page_size} tokens)", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if not 0 <= args.port <= 65535:
            raise UserError(f"--port {args.port}: must be in 0..65535")
        budget = parse_kv_budget(args.kv_budget) if args.kv_budget is not None else None
        if not Path(args.package).is_dir():
            raise UserError(f"package directory {args.package} does not exist (expected a compiled package such as "
                            "dist/NAME)")
        from atom_tvm.runtime.engine import open_package

        package = open_package(args.package, device=args.device)
        if budget is None:
            kv = {"kv_tokens": args.max_batch * package.context_window_size, "kv_bytes": DEFAULT_KV_BYTES}
        else:
            kv = {"kv_tokens" if budget[0] == "tokens" else "kv_bytes": budget[1]}
        engine = Engine(package, max_batch=args.max_batch, **kv)
        server = Server(engine, args.model_name or Path(args.package).resolve().name, package.config)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    engine.start()
    try:
        asyncio.run(_serve(server, args.host, args.port))
    except OSError as err:  # the port is taken, the address is not ours, ...
        print(f"error: cannot listen on {args.host}:{args.port}: {err}", file=sys.stderr)
        return 2
    finally:
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
