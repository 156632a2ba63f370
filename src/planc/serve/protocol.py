"""The OpenAI wire format: request models, response and stream-chunk bodies, and the error shape.

Requests are validated strictly (no "5" for an integer, no 1 for a boolean). Fields this server
does not implement are refused by name when a request sets them to anything but their neutral
value, rather than silently ignored; fields it does not know (newer client options) are ignored.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """A request that fails, as OpenAI reports it: status code and {"error": {...}} body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class StreamOptions(_Request):
    include_usage: bool = Field(False, description="Send a last chunk with the token counts.")


class _Sampling(_Request):
    """Fields both endpoints share."""

    model: str = Field(description="The served model's name (GET /v1/models).")
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate at most; omitted: see the endpoint.")
    temperature: float | None = Field(None, ge=0, le=2, description="0 is greedy; omitted: the plan's decoding.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass (with temperature > 0).")
    seed: int | None = Field(None, description="Seed of this request's sampling generator.")
    stop: str | list[str] | None = Field(None, description="Up to 4 strings that end the completion (not returned).")
    stream: bool = Field(False, description="Server-sent events, one chunk per piece of text.")
    stream_options: StreamOptions | None = None
    n: int = Field(1, description="Choices per request; only 1.")
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    return_token_ids: bool = Field(False, description="Also return the token ids (an extension, as in vLLM).")

    def unsupported(self) -> list[str]:
        """Fields set to something this server does not do."""
        found = []
        if self.n != 1:
            found.append("n")
        if self.presence_penalty != 0:
            found.append("presence_penalty")
        if self.frequency_penalty != 0:
            found.append("frequency_penalty")
        if self.logit_bias:
            found.append("logit_bias")
        return found

    def stop_strings(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 4:
            raise bad_request(f"stop takes at most 4 strings, got {len(stop)}", param="stop")
        return stop


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(description="Text or token ids; one prompt.")
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> list[str]:
        found = super().unsupported()
        found += [name for name in ("echo", "logprobs", "suffix") if getattr(self, name)]
        if self.best_of not in (None, 1):
            found.append("best_of")
        return found

    def single_prompt(self) -> str | list[int]:
        """The one prompt this request carries (a list of one prompt is accepted too)."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise bad_request(
                    f"one prompt per request, got {len(prompt)}; send them as separate requests", param="prompt"
                )
            prompt = prompt[0]
        if not prompt:
            raise bad_request("prompt is empty", param="prompt")
        return prompt


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def for_template(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) or self.content is None else "".join(
            part.text for part in self.content
        )
        message = {"role": self.role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name of max_tokens.")
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> list[str]:
        found = super().unsupported()
        found += [name for name in ("logprobs", "top_logprobs", "tools") if getattr(self, name)]
        if self.tool_choice not in (None, "none", "auto"):
            found.append("tool_choice")
        if self.response_format not in (None, {"type": "text"}):
            found.append("response_format")
        return found

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def parse(model: type[_Request], body: bytes) -> _Request:
    """JSON bytes to a validated request, or a 400 naming what is wrong and where."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"the body is not valid JSON ({exc})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request(f"the body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    try:
        request = model.model_validate(data)
    except ValidationError as exc:
        raise bad_request(*_first_problem(exc)) from None
    unsupported = request.unsupported()
    if unsupported:
        raise bad_request(
            f"this server does not support {', '.join(unsupported)}; leave {'them' if len(unsupported) > 1 else 'it'} "
            "unset", param=unsupported[0], code="unsupported_parameter"
        )
    return request


def _first_problem(exc: ValidationError) -> tuple[str, str | None]:
    """The first invalid field as "where: what", and where. pydantic reports each branch of a union
    (tagged "str", "list[int]", ...) as its own error: at one level they are one problem (none of
    the accepted types), at different depths the deepest is the most telling."""
    errors = exc.errors()
    field = errors[0]["loc"][:1]
    group = [(_field_path(e["loc"]), e) for e in errors if e["loc"][:1] == field]
    if len(group) > 1 and len({path for path, _ in group}) == 1:
        path, first = group[0]
        where = ".".join(map(str, path)) or None
        message = f"{where}: {type(first['input']).__name__} is not one of the accepted types"
    else:
        path, first = max(group, key=lambda item: len(item[0]))
        where = ".".join(map(str, path)) or None
        message = f"{where}: {first['msg']}" if where else first["msg"]
    others = len({e["loc"][:1] for e in errors}) - 1
    if others:
        message += f" (and {others} more field{'s' if others > 1 else ''})"
    return message, where


def _field_path(loc: tuple) -> tuple:
    """The location without pydantic's union-branch tags (field names here are lower snake case)."""
    return tuple(part for part in loc if not isinstance(part, str) or (part.islower() and "[" not in part
                                                                          and part not in _TYPE_TAGS))


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list"}


# ---------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(rid: str, model: str, created: int, text: str, finish_reason: str, prompt_ids: list[int],
                    token_ids: list[int], with_ids: bool) -> dict:
    choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
    if with_ids:
        choice.update(prompt_token_ids=prompt_ids, token_ids=token_ids)
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice],
            "usage": usage(len(prompt_ids), len(token_ids))}


def completion_chunk(rid: str, model: str, created: int, text: str, finish_reason: str | None,
                     token_ids: list[int] | None = None) -> dict:
    choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def chat_body(rid: str, model: str, created: int, text: str, finish_reason: str, prompt_ids: list[int],
              token_ids: list[int], with_ids: bool) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
              "logprobs": None}
    body = {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": [choice],
            "usage": usage(len(prompt_ids), len(token_ids))}
    if with_ids:
        choice["token_ids"] = token_ids
        body["prompt_token_ids"] = prompt_ids
    return body


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish_reason: str | None,
               token_ids: list[int] | None = None) -> dict:
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}


def usage_chunk(rid: str, model: str, created: int, kind: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": kind, "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def sse(data: dict | str) -> bytes:
    """One server-sent event."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"data: {text}\n\n".encode()
