"""OpenAI request bodies (plus vLLM's extra fields), validated by pydantic, and the error shape.

Whatever a body says must be honoured or refused with a 400: fields with no effect here are not accepted
silently (a lone surrogate, `stream_options` without `stream`, an unknown role, a tool message without
`tool_call_id`, ...). Unknown fields are ignored, as OpenAI clients send extras.
"""

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from pagedserve.sampling_params import MAX_LOGPROBS, RequestOutputKind, SamplingParams, StructuredOutputsParams

# A token id is a JSON integer: `true` is not token 1, nor `1.0` (pydantic's lax ints would take both).
TokenId = StrictInt
# `stop` is searched for in every new piece of text, on the server's event loop: its size is bounded. OpenAI allows
# 4 strings; vLLM sets no bound. At this bound (64 strings of 256 characters) the search takes ~20 us a token.
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 256


def _check_unicode(value: Any, where: str = "body") -> None:
    """Refuse lone surrogates anywhere in the body: JSON can spell them ("\\ud800"), UTF-8 cannot."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{where} is not valid Unicode (it contains a lone surrogate)") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key, where)
            _check_unicode(item, f"{where}.{key}" if where != "body" else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_unicode(item, f"{where}[{i}]")


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    name: str = "response"
    description: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('response_format of type "json_schema" needs a json_schema')
        return self

    def structured_outputs(self) -> StructuredOutputsParams | None:
        if self.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if self.type == "json_schema" and self.json_schema is not None:
            return StructuredOutputsParams(json=self.json_schema.json_schema)
        return None


class SamplingFields(BaseModel):
    """Fields shared by completions and chat."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[Annotated[TokenId, Field(ge=0)]] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    cache_salt: str | None = None
    return_token_ids: bool = False  # each choice also carries its token ids
    structured_outputs: dict[str, Any] | None = None  # StructuredOutputsParams' fields
    priority: int = 0  # lower first, with --scheduling-policy priority
    # An agent session: the KV of this request is kept for the session's next one (a lease) for kv_retention_s
    # seconds (absent: the engine's guess from the session's pauses; 0: not kept).
    session_id: str | None = None
    kv_retention_s: float | None = None

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        _check_unicode(data)
        return data

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stops)}")
        if any(len(s) > MAX_STOP_STRING_CHARS for s in stops):
            raise ValueError(f"a stop string has at most {MAX_STOP_STRING_CHARS} characters")
        return stop

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> "SamplingFields":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        """The constraint from `structured_outputs` or `response_format` (ValueError if both)."""
        from_format = self.response_format.structured_outputs() if self.response_format is not None else None
        if self.structured_outputs is not None:
            if from_format is not None:
                raise ValueError("give either response_format or structured_outputs, not both")
            return StructuredOutputsParams.from_dict(self.structured_outputs)
        return from_format

    def prompt_logprobs_count(self) -> int | None:
        """How many alternatives each prompt token's logprobs carry (None: no prompt logprobs)."""
        return None

    def sampling_params(self, max_tokens: int, logprobs: int | None, defaults: dict[str, float | int],
                        structured_outputs: StructuredOutputsParams | None = None) -> SamplingParams:
        """ValueError (-> 400) for values SamplingParams rejects. `defaults` (the checkpoint's generation
        config) fill the sampling fields the request leaves out."""

        def pick(name: str, value: float | int | None, fallback: float | int) -> Any:
            return value if value is not None else defaults.get(name, fallback)

        return SamplingParams(
            n=self.n,
            temperature=pick("temperature", self.temperature, 1.0),
            top_p=pick("top_p", self.top_p, 1.0),
            top_k=pick("top_k", self.top_k, 0),
            min_p=pick("min_p", self.min_p, 0.0),
            repetition_penalty=pick("repetition_penalty", self.repetition_penalty, 1.0),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            seed=self.seed,
            ignore_eos=self.ignore_eos,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            logprobs=logprobs,
            prompt_logprobs=self.prompt_logprobs_count(),
            logit_bias=self.logit_bias,  # type: ignore[arg-type]  # decimal-string keys: SamplingParams parses them
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            structured_outputs=structured_outputs,
            output_kind=RequestOutputKind.DELTA if self.stream else RequestOutputKind.FINAL_ONLY,
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: int | None = 16
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False
    suffix: str | None = None
    # vLLM's extra: each prompt token's logprob and the top prompt_logprobs alternatives, in the choice
    prompt_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens 0 (lm-eval's loglikelihood requests): the prompt alone comes back, scored."""
        return self.echo and self.max_tokens == 0

    def prompt_logprobs_count(self) -> int | None:
        """echo with logprobs scores the echoed prompt too (OpenAI's legacy completions)."""
        counts = [c for c in (self.prompt_logprobs, self.logprobs if self.echo else None) if c is not None]
        return max(counts) if counts else None

    def prompts(self) -> list[dict]:
        """The prompt(s) as engine prompts: one dict per prompt, text or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [{"prompt": prompt}]
        if not prompt:
            raise ValueError("prompt must not be empty")
        if all(isinstance(p, str) for p in prompt):
            return [{"prompt": p} for p in prompt]
        if all(isinstance(p, int) for p in prompt):
            return [{"prompt_token_ids": prompt}]
        return [{"prompt_token_ids": p} for p in prompt]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCallParam(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallParam(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallParam



class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, reasoning, ... reach the chat template

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | dict[str, Any]] | None = None
    tool_calls: list[ToolCallParam] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "ChatMessage":
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a message with role 'tool' needs the tool_call_id it answers")
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"only assistant messages carry tool_calls, not {self.role!r} ones")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a message with role {self.role!r} needs content")
        if isinstance(self.content, list):
            for part in self.content:
                if not isinstance(part, TextPart):
                    kind = part.get("type") if isinstance(part, dict) else None
                    raise ValueError(f"message content of type {kind!r} is not supported; only 'text' parts are")
        return self

    def text(self) -> str | None:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content if isinstance(part, TextPart))
        return self.content

    def for_template(self) -> dict:
        """The message as chat templates take it: text content, and tool-call arguments as objects (the
        templates of Qwen, Llama 3, Mistral, ... render `arguments | tojson`)."""
        message = self.model_dump(exclude_none=True)
        message["content"] = self.text() if self.content is not None else None
        if self.role == "developer":  # OpenAI's newer name for the system message; templates know "system"
            message["role"] = "system"
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": call.id, "type": "function",
                 "function": {"name": call.function.name, "arguments": _arguments_object(call.function.arguments)}}
                for call in self.tool_calls
            ]
        return message


def _arguments_object(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


class FunctionDefinition(BaseModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    chat_template: str | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # vLLM's extra: each prompt token's logprob and the top prompt_logprobs alternatives, in the response
    prompt_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None

    @model_validator(mode="after")
    def _prompt_logprobs_not_streamed(self) -> "ChatCompletionRequest":
        if self.prompt_logprobs is not None and self.stream:
            raise ValueError("prompt_logprobs are not available when stream is true")
        return self

    def prompt_logprobs_count(self) -> int | None:
        return self.prompt_logprobs

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs to be true")
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def tool_dicts(self) -> list[dict] | None:
        return [tool.model_dump(exclude_none=True) for tool in self.tools] if self.tools else None

    @property
    def effective_tool_choice(self) -> str | dict:
        """OpenAI's default: "auto" when tools are given, else "none"."""
        if self.tool_choice is None:
            return "auto" if self.tools else "none"
        return self.tool_choice if isinstance(self.tool_choice, str) else self.tool_choice.model_dump()


class SessionCloseRequest(BaseModel):
    """The optional body of POST /v1/sessions/{session_id}/close: a session is its tenant's, so the close names
    the cache_salt its requests gave (none: the session of requests without a salt)."""

    cache_salt: str | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    """Every error the server sends has this shape (OpenAI's)."""

    error: ErrorDetail


def error_body(message: str, err_type: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


class TokenizeCompletionRequest(BaseModel):
    """POST /tokenize with a prompt (vLLM's)."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(BaseModel):
    """POST /tokenize with chat messages, rendered as /v1/chat/completions renders them (vLLM's)."""

    model: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    tools: list[ToolDefinition] | None = None
    chat_template: str | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[TokenId]
