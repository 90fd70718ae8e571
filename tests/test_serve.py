"""`python -m atom_tvm.serve`: the server runs as its own process on a free port (the tiny model of
test_engine.py with TVM's KV cache) and is driven by a real HTTP client (aiohttp)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cli import REPO

aiohttp = pytest.importorskip("aiohttp")
pytest.importorskip("torch")  # the tiny model is written by transformers

from test_engine import tiny_package  # noqa: E402  (the tiny package is built once per session)

MODEL = "tiny"
CLIENTS, REQUESTS_PER_CLIENT = 64, 20


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Base URL of a server process; stopped with SIGINT (it must exit cleanly) at the end."""
    package = tiny_package(tmp_path_factory, "tvm")
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "atom_tvm.serve", str(package), "--port", "0",
                                 "--max-batch", "64", "--kv-budget", "16384", "--model-name", MODEL],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 120
    url = None
    while url is None:
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        for line in log.read_text().splitlines():
            if " on http://" in line:
                url = line.split(" on ")[1].split()[0]
        time.sleep(0.2)
    yield url
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0, log.read_text()


def run(coro):
    return asyncio.run(coro)


async def post(session, url: str, body, raw: bytes | None = None):
    data = raw if raw is not None else json.dumps(body).encode()
    async with session.post(url, data=data, headers={"Content-Type": "application/json"}) as resp:
        return resp.status, await resp.json(content_type=None)


async def read_events(resp) -> list[str]:
    """The data fields of a server-sent event stream, checking its framing."""
    events, lines = [], []
    async for raw in resp.content:
        line = raw.decode()
        assert line.endswith("\n")
        if line == "\n":
            assert len(lines) == 1 and lines[0].startswith("data: "), lines
            events.append(lines[0][len("data: "):-1])
            lines = []
        else:
            lines.append(line)
    assert not lines, "the stream ended inside an event"
    return events


def request_body(kind: str, words: str, max_tokens: int, stream: bool) -> dict:
    body = {"model": MODEL, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if kind == "chat":
        return {**body, "messages": [{"role": "user", "content": words}]}
    return {**body, "prompt": words}


def check_stream(kind: str, events: list[str]) -> tuple[str, str, dict]:
    """A complete, well-formed stream: JSON chunks of one id, the last choice chunk carrying the
    finish reason, a usage chunk, then [DONE]. Returns (text, finish reason, usage)."""
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    assert {c["object"] for c in chunks} == {"chat.completion.chunk" if kind == "chat" else "text_completion"}
    *choices, usage = chunks
    assert usage["choices"] == [] and set(usage["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    reasons = [c["choices"][0]["finish_reason"] for c in choices]
    assert reasons[-1] in ("stop", "length") and set(reasons[:-1]) <= {None}
    if kind == "chat":
        assert choices[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in choices[1:])
    else:
        text = "".join(c["choices"][0]["text"] for c in choices)
    return text, reasons[-1], usage["usage"]


def prompt_pool() -> list[tuple[str, str, int]]:
    """(kind, words, max_tokens): chat and completion prompts of 1 to 16 words."""
    import numpy as np

    rng = np.random.default_rng(7)
    return [("chat" if i % 2 else "completion", " ".join(f"w{w}" for w in rng.integers(3, 512, 1 + i)),
             int(rng.integers(1, 11))) for i in range(16)]


def test_64_concurrent_streaming_clients_lose_nothing(server):
    pool = prompt_pool()

    async def main():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            expected = []
            for kind, words, max_tokens in pool:  # one at a time, not streamed: the reference
                path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
                status, body = await post(session, server + path, request_body(kind, words, max_tokens, False))
                assert status == 200, body
                choice = body["choices"][0]
                text = choice["message"]["content"] if kind == "chat" else choice["text"]
                expected.append((text, choice["finish_reason"], body["usage"]))
            open_streams, peak = 0, 0

            async def client(c: int) -> int:
                nonlocal open_streams, peak
                for r in range(REQUESTS_PER_CLIENT):
                    i = (c + r) % len(pool)
                    kind, words, max_tokens = pool[i]
                    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
                    async with session.post(server + path, json=request_body(kind, words, max_tokens, True)) as resp:
                        assert resp.status == 200 and resp.content_type == "text/event-stream"
                        open_streams += 1
                        peak = max(peak, open_streams)
                        events = await read_events(resp)
                        open_streams -= 1
                    assert check_stream(kind, events) == expected[i], (c, r, i)
                return REQUESTS_PER_CLIENT

            done = await asyncio.gather(*(client(c) for c in range(CLIENTS)))
            assert sum(done) == CLIENTS * REQUESTS_PER_CLIENT
            assert peak >= CLIENTS // 2  # the streams did overlap
            return await metrics(session, server)

    m = run(main())
    assert m["atom_tvm_requests_running"] == m["atom_tvm_requests_waiting"] == m["atom_tvm_kv_pages_used"] == 0
    assert m['atom_tvm_requests_finished_total{reason="abort"}'] == 0
    assert m['atom_tvm_requests_finished_total{reason="error"}'] == 0


async def metrics(session, url: str) -> dict[str, float]:
    async with session.get(url + "/metrics") as resp:
        assert resp.status == 200 and resp.content_type == "text/plain"
        text = await resp.text()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


HUGE = " ".join(["w5"] * 300_000)


@pytest.mark.parametrize("path, body, status, needle", [
    ("/v1/completions", b'{"prompt": "w5", "max_tokens": ', 400, "not valid JSON"),
    ("/v1/completions", b"\xff\xfe", 400, "not valid JSON"),
    ("/v1/completions", [1, 2], 400, "JSON object"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "w5"}, 404, "gpt-4"),
    ("/v1/chat/completions", {"model": "llama", "messages": [{"role": "user", "content": "w5"}]}, 404, "tiny"),
    ("/v1/completions", {"prompt": "w5", "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "w5", "max_tokens": "10"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "w5", "max_tokens": 10_000}, 400, "context window"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w5"}], "max_completion_tokens": 0}, 400,
     "max_completion_tokens"),
    ("/v1/completions", {"prompt": HUGE}, 400, "300000 tokens does not fit"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": HUGE}]}, 400, "does not fit"),
    ("/v1/completions", {"prompt": ["w5", "w6"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [5, 100_000]}, 400, "[0, 512)"),
    ("/v1/completions", {"prompt": ""}, 400, "empty prompt"),
    ("/v1/completions", {"prompt": "w5", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "w5", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "w5", "seed": -1}, 400, "seed"),
    ("/v1/completions", {"prompt": "w5", "stop": [1]}, 400, "stop"),
    ("/v1/completions", {"prompt": "w5", "n": 2}, 400, "'n'"),
    ("/v1/completions", {"prompt": "w5", "stream": "yes"}, 400, "stream"),
    ("/v1/chat/completions", {"messages": "w5"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "w5"}]}, 400, "robot"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "content"),
    ("/v1/embeddings", {"input": "w5"}, 404, "no such endpoint"),
])
def test_bad_requests_get_4xx_with_a_message_and_the_server_keeps_answering(server, path, body, status, needle):
    async def main():
        async with aiohttp.ClientSession() as session:
            raw = body if isinstance(body, bytes) else None
            got, answer = await post(session, server + path, body, raw)
            assert got == status, answer
            assert needle in answer["error"]["message"], answer
            assert answer["error"]["type"] == "invalid_request_error"
            async with session.get(server + "/health") as resp:
                assert resp.status == 200 and (await resp.json())["status"] == "ok"
            got, answer = await post(session, server + "/v1/completions", {"prompt": "w5 w6", "max_tokens": 2})
            assert got == 200 and answer["usage"]["completion_tokens"] <= 2

    run(main())


def test_oversized_body_and_wrong_method(server):
    async def main():
        async with aiohttp.ClientSession() as session:
            status, answer = await post(session, server + "/v1/completions", None, raw=b" " * (33 * 2**20))
            assert status == 413 and "too large" in answer["error"]["message"]
            async with session.get(server + "/v1/completions") as resp:
                assert resp.status == 405 and "not allowed" in (await resp.json())["error"]["message"]
            async with session.get(server + "/health") as resp:
                assert resp.status == 200

    run(main())


def test_models_and_a_stop_string(server):
    async def main():
        async with aiohttp.ClientSession() as session:
            async with session.get(server + "/v1/models") as resp:
                listing = await resp.json()
            assert [m["id"] for m in listing["data"]] == [MODEL] and listing["object"] == "list"
            body = {"prompt": "w11 w12 w13", "max_tokens": 12, "temperature": 0}
            status, full = await post(session, server + "/v1/completions", body)
            text = full["choices"][0]["text"]
            stop = text.split(" ")[2]
            status, cut = await post(session, server + "/v1/completions", {**body, "stop": [" " + stop]})
            assert cut["choices"][0] == {**full["choices"][0], "text": text[:text.index(" " + stop)],
                                         "finish_reason": "stop"}
            assert full["object"] == "text_completion" and full["usage"]["prompt_tokens"] == 3

    run(main())


def test_a_client_that_disconnects_has_its_request_cancelled(server):
    async def main():
        async with aiohttp.ClientSession() as session:
            body = {"prompt": "w40 w41 w42", "max_tokens": 200, "temperature": 0}
            status, whole = await post(session, server + "/v1/completions", body)
            assert whole["choices"][0]["finish_reason"] == "length"  # it runs to max_tokens if let
            before = await metrics(session, server)
            resp = await session.post(server + "/v1/completions", json={**body, "stream": True})
            assert resp.status == 200
            await resp.content.readline()  # the first event has started
            resp.close()  # drop the connection mid-stream
            deadline = time.monotonic() + 20
            while True:
                m = await metrics(session, server)
                aborted = (m['atom_tvm_requests_finished_total{reason="abort"}'] -
                           before['atom_tvm_requests_finished_total{reason="abort"}'])
                if aborted == 1 and m["atom_tvm_requests_running"] == 0:
                    break
                assert time.monotonic() < deadline, m
                await asyncio.sleep(0.05)
            assert m["atom_tvm_kv_pages_used"] == 0
            generated = m["atom_tvm_generated_tokens_total"] - before["atom_tvm_generated_tokens_total"]
            assert generated < 200  # it did not run to max_tokens

    run(main())


@pytest.mark.parametrize("args, needles", [
    (["nope"], ["nope", "does not exist"]),
    (["--kv-budget", "lots"], ["--kv-budget", "GiB"]),
    (["--port", "70000"], ["--port", "0..65535"]),
])
def test_cli_errors_are_one_line_before_loading_anything(tmp_path, capsys, args, needles):
    from atom_tvm import serve

    argv = [str(tmp_path / args[0])] if args == ["nope"] else [str(tmp_path), *args]
    assert serve.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and all(n in err[0] for n in needles), err


def test_kv_budget_is_tokens_or_a_size():
    from atom_tvm.errors import UserError
    from atom_tvm.serve import parse_kv_budget

    assert parse_kv_budget("4096") == ("tokens", 4096) and parse_kv_budget("1.5 GiB") == ("bytes", 3 * 2**29)
    assert parse_kv_budget("512MB") == ("bytes", 512 * 10**6)
    for bad in ("", "-1", "lots", "0", "5 parsecs", "infGiB"):
        with pytest.raises(UserError, match="--kv-budget"):
            parse_kv_budget(bad)
