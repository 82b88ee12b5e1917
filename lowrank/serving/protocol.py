"""OpenAI's request bodies checked field by field, and its error object.

Every check raises ``ApiError(status, message, param)``; the app turns it into
``{"error": {"message", "type", "param", "code"}}`` with that HTTP status, so a bad field is a
400 that names it, never a crash of the loop. Fields the server does not use are ignored, as
OpenAI's server ignores unknown ones.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 408: "timeout_error",
         409: "conflict_error", 413: "invalid_request_error", 429: "rate_limit_error", 503: "server_overloaded"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.status}}


@dataclass
class Sampling:
    model: str
    max_tokens: int | None
    temperature: float
    top_p: float | None
    seed: int | None
    stop: list
    stream: bool


def _number(body, name, default, low, high, low_open=False):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ApiError(400, f"'{name}' must be a finite number, got {value!r}", name)
    if value < low or (low_open and value == low) or value > high:
        raise ApiError(400, f"'{name}' must lie in {'(' if low_open else '['}{low}, {high}], got {value!r}", name)
    return float(value)


def _integer(body, name, low=None):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"'{name}' must be an integer, got {value!r}", name)
    if low is not None and value < low:
        raise ApiError(400, f"'{name}' must be >= {low}, got {value}", name)
    return value


def sampling(body) -> Sampling:
    """The fields both endpoints share, checked."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, f"'model' must be a non-empty string (the base or an adapter), got {model!r}", "model")
    if body.get("n", 1) != 1:
        raise ApiError(400, f"'n' must be 1 (one choice per request), got {body.get('n')!r}", "n")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"'stop' must be a non-empty string or a list of up to 4, got {body.get('stop')!r}", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"'stream' must be true or false, got {stream!r}", "stream")
    key = "max_completion_tokens" if body.get("max_tokens") is None else "max_tokens"
    return Sampling(model, _integer(body, key, 1), _number(body, "temperature", 1.0, 0.0, 2.0),
                    _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True), _integer(body, "seed"), stop, stream)


def prompt_text(body) -> str:
    """/v1/completions' ``prompt``: a string, or a list holding one."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, f"'prompt' must be a non-empty string (one prompt per request), got "
                            f"{str(prompt)[:80]!r}", "prompt")
    return prompt


def messages(body) -> list:
    """/v1/chat/completions' ``messages``: [{"role": str, "content": str or [{"type": "text", "text"}]}]."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"each message needs a string 'role', got {str(m)[:80]!r}", "messages")
        content = m.get("content")
        if isinstance(content, list):          # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, "message content parts must be {'type': 'text', 'text': str}", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"a message's 'content' must be a string, got {str(content)[:80]!r}", "messages")
        out.append({"role": m["role"], "content": content})
    return out


def stop_at(text: str, stops: list) -> int | None:
    """Index where the first stop string begins in ``text``, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None
