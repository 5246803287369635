"""The OpenAI-compatible request schemas, their validation, and the error shape.

Every request body is parsed here before it reaches the engine. A mistake becomes an `APIError`:
a 4xx with OpenAI's error object (`{"error": {"message", "type", "param", "code"}}`) whose message
names the field and says what was expected. Types are checked strictly (a string is not a number,
`true` is not 1, NaN and infinities are refused).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

MAX_STOP = 4
MAX_STOP_CHARS = 256
INT64 = 1 << 63


MAX_MESSAGE = 1000
"""The longest error message a response carries, in characters."""


class APIError(Exception):
    """An error response: HTTP status + OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        # an error names what was wrong, never echoes a huge input back (a 900 KB model name)
        if len(message) > MAX_MESSAGE:
            message = message[:MAX_MESSAGE - 20] + " ... (cut)"
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        """OpenAI's error object; the message is valid UTF-8 even if the input that caused it was not."""
        message = self.message.encode("utf-8", "backslashreplace").decode("utf-8")
        return {"error": {"message": message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Generation(_Strict):
    """Fields the two endpoints share (OpenAI's defaults)."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    user: str | None = None


class CompletionRequest(_Generation):
    prompt: Any = None
    """A string, a list of strings, a list of token ids or a list of token-id lists (checked by
    `prompt_list`, for one message naming all four)."""
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(_Strict):
    role: str
    content: Any = None
    name: str | None = None


class ChatRequest(_Generation):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None


class LoadRequest(_Strict):
    path: str
    name: str | None = None


@dataclass(frozen=True)
class Limits:
    max_tokens: int
    """The most tokens one request may ask for."""
    context: int
    """Positions of the model: prompt + memory prefix + generated tokens must fit."""
    vocab: int
    max_choices: int
    """prompts x n per request."""


def parse_body(raw: bytes) -> dict:
    """The request body as a JSON object (strict JSON: no NaN / Infinity)."""
    def refuse(token: str):
        raise ValueError(f"{token} is not valid JSON")

    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=refuse)
    except UnicodeDecodeError:
        raise bad("the request body is not UTF-8 text", code="invalid_json") from None
    except RecursionError:
        raise bad("the request body nests arrays or objects too deeply", code="invalid_json") from None
    except ValueError as e:
        raise bad(f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad(f"the request body must be a JSON object, got a JSON {type(data).__name__}", code="invalid_json")
    where = _lone_surrogate(data)
    if where is not None:
        raise bad(f"{where}: a string holds a lone UTF-16 surrogate (an escaped \\ud800-\\udfff without its pair), "
                  "which is not text", param=where, code="invalid_json")
    return data


def _lone_surrogate(data) -> str | None:
    """The path of the first string (key or value) in `data` that is not encodable as UTF-8, or None.
    JSON may escape a lone surrogate ("\\ud800"), which Python decodes into a str that the
    tokenizer and the response writer cannot handle. Iterative: the body may be deeply nested."""
    stack = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return path or "body"
        elif isinstance(value, dict):
            for k, v in value.items():
                if _lone_surrogate(k) is not None:
                    return (path + "." if path else "") + "(a key)"
                stack.append(((path + "." if path else "") + k, v))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(value))
    return None


_EXPECT = {"string_type": "a string", "int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
           "list_type": "a list", "dict_type": "an object", "model_type": "an object", "finite_number": "a finite number",
           "missing": "present (it is required)", "int_from_float": "an integer"}


def validate(cls: type[BaseModel], data: dict):
    """`cls` built from `data`; the first schema error becomes a 400 naming its field."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = _param(err["loc"])
        expected = _EXPECT.get(err["type"])
        got = "" if err["type"] == "missing" else f", got {_show(err.get('input'))}"
        message = f"{param}: must be {expected}{got}" if expected else f"{param}: {err['msg']}{got}"
        raise bad(message, param=param) from None


def _param(loc) -> str:
    out = ""
    for p in loc:
        if isinstance(p, int):
            out += f"[{p}]"
        elif "[" in p or p in ("str", "int", "float"):  # a union member's tag, not a field
            continue
        else:
            out += ("." if out else "") + p
    return out or "body"


def _show(v) -> str:
    text = json.dumps(v) if isinstance(v, (str, int, float, bool, type(None))) else type(v).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def check_generation(req: _Generation, limits: Limits, max_tokens_field: str = "max_tokens") -> None:
    """Ranges of the shared fields, and refusal of options koff does not implement."""
    if req.temperature is not None and not 0 <= req.temperature <= 2:
        raise bad(f"temperature: must be between 0 and 2, got {req.temperature}", "temperature")
    if req.top_p is not None and not 0 < req.top_p <= 1:
        raise bad(f"top_p: must be greater than 0 and at most 1, got {req.top_p}", "top_p")
    if req.n is not None and not 1 <= req.n <= limits.max_choices:
        raise bad(f"n: must be between 1 and {limits.max_choices}, got {req.n}", "n")
    if req.seed is not None and not -INT64 <= req.seed < INT64:
        raise bad(f"seed: must fit in 64 bits, got {req.seed}", "seed")
    if req.max_tokens is not None:
        check_max_tokens(req.max_tokens, limits, max_tokens_field)
    for field in ("presence_penalty", "frequency_penalty"):
        if getattr(req, field) not in (None, 0, 0.0):
            raise bad(f"{field}: koff serve does not support penalties (only 0)", field)
    if req.logit_bias:
        raise bad("logit_bias: not supported by koff serve", "logit_bias")
    if req.stream_options is not None and not req.stream:
        raise bad("stream_options: only allowed with stream: true", "stream_options")


def check_max_tokens(value: int, limits: Limits, field: str) -> None:
    if value < 1:
        raise bad(f"{field}: must be at least 1, got {value}", field)
    if value > limits.max_tokens:
        raise bad(f"{field}: at most {limits.max_tokens} tokens per request on this server, got {value}", field)


def stop_list(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > MAX_STOP:
        raise bad(f"stop: at most {MAX_STOP} sequences, got {len(stops)}", "stop")
    for s in stops:
        if not s or len(s) > MAX_STOP_CHARS:
            raise bad(f"stop: each sequence must have 1 to {MAX_STOP_CHARS} characters, got {_show(s)}", "stop")
    return tuple(stops)


def prompt_list(prompt, limits: Limits) -> list[str | list[int]]:
    """The prompts of a completion request: text, or token ids checked against the vocabulary."""
    expected = "a string, a list of strings, a list of token ids, or a list of token-id lists"
    if prompt is None:
        raise bad("prompt: required (" + expected + ")", "prompt")
    if isinstance(prompt, str) or isinstance(prompt, list) and prompt and all(_is_id(t) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and (all(isinstance(p, str) for p in prompt)
                                                  or all(isinstance(p, list) for p in prompt)):
        prompts = list(prompt)
    elif isinstance(prompt, list) and not prompt:
        raise bad("prompt: must not be an empty list", "prompt")
    else:
        raise bad(f"prompt: must be {expected}, got {_show(prompt)}", "prompt")
    for i, p in enumerate(prompts):
        where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        if isinstance(p, str):
            if not p:
                raise bad(f"{where}: must not be empty", "prompt")
            continue
        if not p:
            raise bad(f"{where}: must not be an empty list of token ids", "prompt")
        for t in p:
            if not _is_id(t):
                raise bad(f"{where}: token ids must be integers, got {_show(t)}", "prompt")
            if not 0 <= t < limits.vocab:
                raise bad(f"{where}: token id {t} is outside the vocabulary [0, {limits.vocab})", "prompt")
    return prompts


def _is_id(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


CHAT_ROLES = ("system", "developer", "user", "assistant")


def chat_messages(messages: list[ChatMessage]) -> list[dict]:
    """Messages as the chat template takes them (text content only)."""
    if not messages:
        raise bad("messages: must hold at least one message", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if m.role not in CHAT_ROLES:
            raise bad(f"{where}.role: must be one of {', '.join(CHAT_ROLES)}, got {_show(m.role)} (koff serve has no "
                      "tool calls)", f"{where}.role")
        content = m.content
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise bad(f"{where}.content[{j}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) are "
                              f"supported, got {_show(part)}", f"{where}.content")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise bad(f"{where}.content: must be a string or a list of text parts, got {_show(content)}",
                      f"{where}.content")
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out


def check_chat(req: ChatRequest, limits: Limits) -> int | None:
    """The chat-only fields; returns the requested max tokens (None: as many as fit)."""
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise bad("max_tokens and max_completion_tokens: give one of them", "max_completion_tokens")
    field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    value = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    check_generation(req, limits, field)
    if value is not None:
        check_max_tokens(value, limits, field)
    for f in ("tools", "functions"):
        if getattr(req, f):
            raise bad(f"{f}: tool calls are not supported by koff serve", f)
    if req.logprobs or req.top_logprobs:
        raise bad("logprobs: not supported by koff serve", "logprobs")
    if req.response_format not in (None, {"type": "text"}):
        raise bad("response_format: only {\"type\": \"text\"} is supported", "response_format")
    return value


def check_completion(req: CompletionRequest, limits: Limits) -> None:
    check_generation(req, limits)
    if req.echo:
        raise bad("echo: not supported by koff serve", "echo")
    if req.logprobs is not None:
        raise bad("logprobs: not supported by koff serve", "logprobs")
    if req.best_of not in (None, 1):
        raise bad("best_of: only 1 is supported", "best_of")
    if req.suffix:
        raise bad("suffix: not supported by koff serve", "suffix")
