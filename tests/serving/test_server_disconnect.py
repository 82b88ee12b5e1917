"""A client that goes away frees its row: streamed (the connection closed after two chunks) and not (the
client's read timeout), the row leaves cancelled long before its max_tokens, and the server answers
the next request. Each decode step is slowed to 20 ms so that a row left running would still be
generating when the test looks."""
import time

import httpx
import pytest

import lowrank.serving.engine as engine_module
from lowrank.app.serve import build_server

from serving_fixtures import running, serve_args

STEP_S, MAX_TOKENS = 0.02, 240              # 240 steps: about 5 s if the row were never freed


@pytest.fixture
def slow_server(monkeypatch):
    decode_step = engine_module.decode_step

    def slow(*args):
        time.sleep(STEP_S)
        return decode_step(*args)
    monkeypatch.setattr(engine_module, "decode_step", slow)
    app, server = build_server(serve_args(max_batch=4))
    finished = []                           # (request, finish reason) as the engine ends each row
    submit = server.engine.submit

    def spy(r):
        emit = r.emit
        r.emit = lambda kind, value: (finished.append((r, value)) if kind == "done" else None, emit(kind, value))
        return submit(r)
    server.engine.submit = spy
    with running(app) as url:
        yield url, server, finished


def body(stream):
    return {"model": "pydoc-byte-4x128", "prompt": "def ", "max_tokens": MAX_TOKENS, "temperature": 0,
            "stream": stream}


def wait_until_idle(server, seconds):
    deadline = time.monotonic() + seconds
    while server.engine.rows or server.engine.waiting:
        assert time.monotonic() < deadline, f"a row is still running {seconds} s after its client went away"
        time.sleep(0.02)


def test_a_streaming_client_that_closes_frees_its_row(slow_server):
    url, server, finished = slow_server
    with httpx.Client(timeout=30) as c, c.stream("POST", f"{url}/v1/completions", json=body(True)) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))
        assert next(line for line in lines if line.startswith("data: {"))
    wait_until_idle(server, 2.0)
    (request, reason), = finished
    assert reason == "cancelled" and len(request.tokens) < MAX_TOKENS // 2
    assert httpx.post(f"{url}/v1/completions", json={**body(False), "max_tokens": 3}).status_code == 200


def test_a_client_that_stops_waiting_for_a_completion_frees_its_row(slow_server):
    url, server, finished = slow_server
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=body(False), timeout=httpx.Timeout(30, read=0.5))
    wait_until_idle(server, 2.0)
    (request, reason), = finished
    assert reason == "cancelled" and len(request.tokens) < MAX_TOKENS // 2
    assert httpx.post(f"{url}/v1/completions", json={**body(False), "max_tokens": 3}).status_code == 200
