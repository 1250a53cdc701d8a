"""The OpenAI shapes `lorafit serve` speaks: requests as pydantic models (so a malformed one is a 400 by
validation, before anything runs), responses as the `openai` client and vLLM users expect, and the one
error shape every 4xx/5xx answer takes: {"error": {"message", "type", "param", "code"}}.

Fields lorafit does not implement (n > 1, logprobs, tools, penalties, ...) are refused by name when set to
anything but their default; fields it does not know are ignored, as OpenAI's own server ignores them.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP = 16            # stop strings per request
MAX_CLASSIFY_INPUTS = 64  # inputs per /v1/classify request


# ----------------------------------------------------------------------------------------------
# Errors: raised anywhere below the routes, turned into the OpenAI error shape by app.py


class APIError(Exception):
    """A request the server answers with an error: *status*, OpenAI's *type*/*code*, the *param* at fault."""

    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int | None = None):
        super().__init__(message)
        self.message, self.param = message, param
        self.code = code or self.code
        self.status = status or self.status

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def body_json(self) -> str:
        return json.dumps(self.body())


class NotFound(APIError):
    status, code = 404, "model_not_found"


class Unauthorized(APIError):
    status, code = 401, "invalid_api_key"


class TooLarge(APIError):
    status, code = 413, "request_too_large"


class ServerError(APIError):
    status, type, code = 500, "server_error", "internal_error"


class Unavailable(APIError):
    status, type, code = 503, "server_error", "shutting_down"


# ----------------------------------------------------------------------------------------------
# Requests


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    """What chat and text completions share. temperature defaults to 0 (greedy), as `lorafit generate`; one
    below decoding.GREEDY_BELOW (1e-5) is greedy too (dividing by it would overflow). A seed is a 63-bit
    integer (torch's generator takes no more)."""

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    # OpenAI fields with no effect here: accepted at their defaults only
    n: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict] = None
    logprobs: Optional[Any] = None
    top_logprobs: Optional[int] = None
    tools: Optional[list] = None
    response_format: Optional[dict] = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if any(not s for s in stops):
            raise ValueError("a stop string cannot be empty")
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        return stops

    @model_validator(mode="after")
    def _unsupported(self):
        defaults = {"n": (None, 1), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
                    "logit_bias": (None, {}), "logprobs": (None, False, 0), "top_logprobs": (None, 0),
                    "tools": (None, [])}
        for name, allowed in defaults.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"'{name}' is not supported by lorafit serve (leave it at {allowed[-1]!r})")
        if self.response_format not in (None, {"type": "text"}):
            raise ValueError("'response_format' is not supported by lorafit serve (text only)")
        return self

    @property
    def limit(self) -> int | None:
        """max_completion_tokens (OpenAI's newer name) or max_tokens."""
        return self.max_completion_tokens or self.max_tokens


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int]]
    echo: bool = False
    suffix: Optional[str] = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("the prompt has no tokens")
        return value

    @model_validator(mode="after")
    def _no_echo(self):
        if self.echo or self.suffix:
            raise ValueError("'echo' and 'suffix' are not supported by lorafit serve")
        return self


class ClassifyRequest(_Request):
    """A text (seq_cls) or a text / list of words (token_cls), or a list of them."""

    model: str
    input: Union[str, list[Union[str, list[str]]]]

    @field_validator("input")
    @classmethod
    def _inputs(cls, value):
        items = [value] if isinstance(value, str) else value
        if not items:
            raise ValueError("no input to classify")
        if len(items) > MAX_CLASSIFY_INPUTS:
            raise ValueError(f"at most {MAX_CLASSIFY_INPUTS} inputs per request")
        return items


class LoadAdapterRequest(_Request):
    lora_name: str = Field(min_length=1, max_length=128)
    lora_path: str = Field(min_length=1)


class UnloadAdapterRequest(_Request):
    lora_name: str = Field(min_length=1)


# ----------------------------------------------------------------------------------------------
# Responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int = 0

    @model_validator(mode="after")
    def _total(self):
        self.total_tokens = self.prompt_tokens + self.completion_tokens
        return self


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lorafit"
    root: str
    parent: Optional[str] = None
    max_model_len: Optional[int] = None
    task: str
    loaded: bool


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    finish_reason: str
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Optional[str] = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Optional[str] = None
    logprobs: None = None


class Completion(BaseModel):
    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class Classification(BaseModel):
    """One input's answer, as `lorafit predict` writes it: label + score, or the words and a tag per word."""

    index: int
    label: Optional[Union[str, int]] = None
    score: Optional[float] = None
    tokens: Optional[list[str]] = None
    tags: Optional[list[Optional[Union[str, int]]]] = None


class ClassifyResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id("classify"))
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[Classification]
    usage: Usage
