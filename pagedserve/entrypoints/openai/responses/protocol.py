"""/v1/responses request bodies (OpenAI's fields plus vLLM's sampling extras), validated by pydantic, and the
items a conversation is made of.

Items are kept as plain dicts once validated (`items_of`): that is how they are stored, listed by
`input_items`, and turned back into chat messages (`chat_messages`) when a later turn names this one as its
`previous_response_id`. Output items have the same shapes as input items, so a history is just the items of
each turn, in order.
"""

import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from pagedserve.sampling_params import MAX_LOGPROBS, StructuredOutputsParams

from ..protocol import ChatMessage, SamplingFields

LOGPROBS_INCLUDE = "message.output_text.logprobs"
MAX_METADATA_KEYS, MAX_METADATA_KEY_LEN, MAX_METADATA_VALUE_LEN = 16, 64, 512


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class TextContent(BaseModel):
    model_config = ConfigDict(extra="ignore")  # annotations, logprobs of an output_text sent back

    type: Literal["input_text", "output_text", "text"]
    text: str


def _text_parts(content: "str | list[TextContent | dict[str, Any]]", where: str) -> None:
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, TextContent):
                raise ValueError(f"{where} of type {part.get('type')!r} is not supported; only text parts are")


class MessageItem(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["message"] = "message"
    id: str | None = None
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[TextContent | dict[str, Any]]
    status: str | None = None

    @model_validator(mode="after")
    def _text_only(self) -> "MessageItem":
        _text_parts(self.content, "message content")
        return self


class FunctionCallItem(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function_call"]
    id: str | None = None
    call_id: str
    name: str
    arguments: str  # JSON text, as the model wrote it
    status: str | None = None


class FunctionCallOutputItem(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function_call_output"]
    id: str | None = None
    call_id: str
    output: str | list[TextContent | dict[str, Any]]
    status: str | None = None

    @model_validator(mode="after")
    def _text_only(self) -> "FunctionCallOutputItem":
        _text_parts(self.output, "function_call_output output")
        return self


def _item_type(value: Any) -> str:
    kind = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", "message")
    return kind if isinstance(kind, str) else "message"


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(_item_type, custom_error_type="item_type",
                  custom_error_message="input items are messages, function_call or function_call_output items"),
]


class FunctionTool(BaseModel):
    """A function tool, in the Responses API's flat shape (chat nests name/parameters under "function")."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def chat_shape(self) -> dict:
        return {"type": "function", "function": self.model_dump(exclude={"type"}, exclude_none=True)}


class FunctionToolChoice(BaseModel):
    type: Literal["function"]
    name: str


class TextFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    type: Literal["text", "json_schema", "json_object"] = "text"
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "TextFormat":
        if self.type == "json_schema" and (self.json_schema is None or not self.name):
            raise ValueError('text.format of type "json_schema" needs a name and a schema')
        return self

    def structured_outputs(self) -> StructuredOutputsParams | None:
        if self.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if self.type == "json_schema":
            return StructuredOutputsParams(json=self.json_schema)
        return None


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")

    format: TextFormat = Field(default_factory=lambda: TextFormat.model_validate({}))


class ResponsesRequest(SamplingFields):
    input: list[InputItem] | str  # the list first: its errors are the ones worth reporting
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionToolChoice | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    store: bool = True
    previous_response_id: str | None = None
    background: bool = False
    metadata: dict[str, str] | None = None
    truncation: Literal["auto", "disabled"] = "disabled"
    include: list[str] | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    conversation: Any = None

    @model_validator(mode="after")
    def _consistent(self) -> "ResponsesRequest":
        if self.n != 1:
            raise ValueError("n must be 1: a response has one output")
        if self.response_format is not None:
            raise ValueError("response_format is a chat completions field; give text.format instead")
        if self.return_token_ids:
            raise ValueError("return_token_ids is not supported by /v1/responses")
        if self.conversation is not None:
            raise ValueError("conversation is not supported; chain turns with previous_response_id")
        if self.background and not self.store:
            raise ValueError("background mode needs store: true (the result is fetched later)")
        if not self.input and self.previous_response_id is None:
            raise ValueError("input must not be empty")
        if self.metadata is not None:
            if len(self.metadata) > MAX_METADATA_KEYS:
                raise ValueError(f"metadata has at most {MAX_METADATA_KEYS} keys, got {len(self.metadata)}")
            for key, value in self.metadata.items():
                if len(key) > MAX_METADATA_KEY_LEN or len(value) > MAX_METADATA_VALUE_LEN:
                    raise ValueError(f"metadata keys are at most {MAX_METADATA_KEY_LEN} characters and values "
                                     f"{MAX_METADATA_VALUE_LEN}; {key[:80]!r} is over")
        unknown = sorted(set(self.include or ()) - {LOGPROBS_INCLUDE})
        if unknown:
            raise ValueError(f"include {unknown[0]!r} is not supported; only {LOGPROBS_INCLUDE!r} is")
        if self.top_logprobs and not self.wants_logprobs:
            raise ValueError(f"top_logprobs needs include [{LOGPROBS_INCLUDE!r}]")
        return self

    @property
    def wants_logprobs(self) -> bool:
        return LOGPROBS_INCLUDE in (self.include or ())

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.wants_logprobs else None

    @property
    def chat_tools(self) -> list[dict]:
        return [tool.chat_shape() for tool in self.tools or ()]

    @property
    def chat_tool_choice(self) -> str | dict:
        """In chat's shape; OpenAI's default: "auto" when tools are given, else "none"."""
        if self.tool_choice is None:
            return "auto" if self.tools else "none"
        if isinstance(self.tool_choice, str):
            return self.tool_choice
        return {"type": "function", "function": {"name": self.tool_choice.name}}

    def output_format(self) -> StructuredOutputsParams | None:
        """The constraint from `text.format` or vLLM's `structured_outputs` (ValueError if both)."""
        from_format = self.text.format.structured_outputs() if self.text is not None else None
        if self.structured_outputs is not None:
            if from_format is not None:
                raise ValueError("give either text.format or structured_outputs, not both")
            return StructuredOutputsParams.from_dict(self.structured_outputs)
        return from_format

    def input_items(self) -> list[dict]:
        """This turn's input as stored items, each with an id (a string input is one user message)."""
        if isinstance(self.input, str):
            return [message_item(new_id("msg"), "user", [{"type": "input_text", "text": self.input}])]
        items = []
        for item in self.input:
            data = item.model_dump(exclude_none=True)
            data["type"] = item.type
            if isinstance(item, MessageItem) and isinstance(item.content, str):
                part = "output_text" if item.role == "assistant" else "input_text"
                data["content"] = [{"type": part, "text": item.content}]
            data.setdefault("id", new_id({"message": "msg", "function_call": "fc"}.get(item.type, "fco")))
            items.append(data)
        return items


# ---- items ------------------------------------------------------------------------------------------


def message_item(item_id: str, role: str, content: list[dict], status: str = "completed") -> dict:
    return {"type": "message", "id": item_id, "role": role, "content": content, "status": status}


def output_text(text: str, logprobs: list[dict] | None = None) -> dict:
    part: dict = {"type": "output_text", "text": text, "annotations": []}
    if logprobs is not None:
        part["logprobs"] = logprobs
    return part


def function_call_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def _text(content: str | list[dict]) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content)


def chat_messages(items: list[dict]) -> list[dict]:
    """Stored items -> chat messages as templates take them. A function_call joins the assistant message just
    before it (the same model turn); its output is a tool message."""
    messages: list[dict] = []
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            messages.append({"role": item["role"], "content": _text(item["content"])})
        elif kind == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            if messages and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": _text(item["output"])})
    return [ChatMessage.model_validate(message).for_template() for message in messages]
