"""Tool calling and structured output through /v1/chat/completions, with the official `openai` client, on a tiny
random-weight model: only the grammar makes the output valid."""

import json

import httpx
import jsonschema
import openai
import pytest
from server_utils import ServerProcess, assert_error
from transformers import AutoTokenizer

from pagedserve.entrypoints.openai.serving_chat import ChoiceTools, ToolPlan
from pagedserve.entrypoints.openai.tool_parsers import get_tool_parser

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {}, "additionalProperties": False}}}
TOOLS = [WEATHER, CLOCK]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(llama_dir):
    proc = ServerProcess(llama_dir, "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                         sizes=("--dtype", "float32", "--max-model-len", "1024", "--num-kv-blocks", "256"))
    yield proc
    assert proc.stop() == 0


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def create(client, **kwargs):
    return client.chat.completions.create(model=client.models.list().data[0].id, messages=kwargs.pop("messages",
                                          MESSAGES), temperature=0, max_tokens=kwargs.pop("max_tokens", 300), **kwargs)


def streamed_calls(client, **kwargs) -> tuple[dict[int, dict], str, str | None]:
    """Tool calls assembled from stream deltas: index -> {"id", "name", "arguments"}; the content; finish."""
    calls: dict[int, dict] = {}
    content, finish = "", None
    for chunk in create(client, stream=True, **kwargs):
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        finish = choice.finish_reason or finish
        for delta in choice.delta.tool_calls or []:
            if delta.id is not None:  # the first delta of a call names it
                assert delta.index not in calls and delta.function.name
                calls[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
            else:
                assert delta.function.name is None
            calls[delta.index]["arguments"] += delta.function.arguments or ""
    return calls, content, finish


def test_required_tool_choice_gives_schema_valid_calls(client):
    resp = create(client, tools=TOOLS, tool_choice="required")
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.id.startswith("call_") and call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    calls, content, finish = streamed_calls(client, tools=TOOLS, tool_choice="required")
    assert finish == "tool_calls" and content == ""
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in choice.message.tool_calls]


def test_no_parallel_tool_calls_gives_one_call(client):
    resp = create(client, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    assert len(resp.choices[0].message.tool_calls) == 1


@pytest.mark.parametrize("name", ["get_weather", "get_time"])
def test_named_tool_choice(client, name):
    choice = {"type": "function", "function": {"name": name}}
    resp = create(client, tools=TOOLS, tool_choice=choice)
    (call,) = resp.choices[0].message.tool_calls
    assert call.function.name == name
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[name])
    if name == "get_time":
        assert json.loads(call.function.arguments) == {}  # empty arguments are not dropped
    calls, content, _ = streamed_calls(client, tools=TOOLS, tool_choice=choice)
    assert content == "" and [(c["name"], c["arguments"]) for c in calls.values()] == [
        (name, call.function.arguments)]


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_call_cut_by_max_tokens_is_not_reported_as_tool_calls(client, tool_choice):
    """A named call cut by max_tokens comes back with its partial arguments, a required one as content with no
    call; either way finish_reason is "length", streamed or not."""
    resp = create(client, tools=TOOLS, tool_choice=tool_choice, max_tokens=6)
    choice = resp.choices[0]
    assert choice.finish_reason == "length"
    calls, content, finish = streamed_calls(client, tools=TOOLS, tool_choice=tool_choice, max_tokens=6)
    assert finish == "length"
    if tool_choice == "required":
        assert choice.message.tool_calls is None and choice.message.content and not calls
    else:
        (call,) = choice.message.tool_calls
        with pytest.raises(ValueError):
            json.loads(call.function.arguments)  # cut: it does not parse
        assert [(c["name"], c["arguments"]) for c in calls.values()] == [("get_weather", call.function.arguments)]


# (text the model wrote, cut by max_tokens) under each tool_choice
CUT_OUTPUTS = [
    ("auto", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'),
    ("auto", '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "get_w'),
    ("required", '[{"name": "get_weather", "parameters": {"city": "Par'),
    ("required", '[{"name": "get_time", "parameters": {}}]'),  # complete just as the budget ran out
    ("named", '{"city": "Par'),
]


@pytest.mark.parametrize("mode,text", CUT_OUTPUTS)
def test_cut_tool_call_outputs_finish_with_length(mode, text):
    """Whatever the parser or the grammar made of an output cut by max_tokens, whole or streamed in pieces, its
    finish_reason is "length", never "tool_calls"."""
    parser = get_tool_parser("hermes") if mode == "auto" else None
    plan = ToolPlan(mode, TOOLS, named="get_weather" if mode == "named" else None, parser=parser)
    _, whole_calls, whole_finish = ChoiceTools(plan, parallel=True).whole(text, "length")
    streaming = ChoiceTools(plan, parallel=True)
    pieces = [text[i:i + 7] for i in range(0, len(text), 7)]
    finishes, streamed_names = [], []
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        _, deltas = streaming.delta(piece, last)
        streamed_names += [d["function"]["name"] for d in deltas if "id" in d]
        finishes.append(streaming.finish_reason("length" if last else None))
    assert whole_finish == "length" and finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert streamed_names == [call.function.name for call in whole_calls]


def test_tool_choice_none_is_plain_text(client):
    resp = create(client, tools=TOOLS, tool_choice="none", max_tokens=8, extra_body={"ignore_eos": True})
    assert resp.choices[0].message.tool_calls is None and len(resp.choices[0].message.content) > 0
    assert resp.choices[0].finish_reason == "length"


def test_auto_tool_choice_streams_like_the_whole_answer(client):
    """Random weights rarely open a call: whatever they write, streamed and whole agree and nothing of a call
    leaks into content."""
    resp = create(client, tools=TOOLS, max_tokens=40)
    message = resp.choices[0].message
    calls, content, finish = streamed_calls(client, tools=TOOLS, max_tokens=40)
    assert content == (message.content or "") and finish == resp.choices[0].finish_reason
    assert "<tool_call>" not in content
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in message.tool_calls or []]


def test_tool_result_round_trip(server, client, llama_dir):
    """An assistant call and its result go back to the model; the tiny model's template has no tools section,
    so they are rendered in the hermes format, with the tools prompt."""
    first = create(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = first.choices[0].message.tool_calls[0]
    messages = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": "22 degrees and sunny"}]
    body = {"messages": messages, "tools": TOOLS, "tool_choice": "none", "max_tokens": 5, "return_token_ids": True}
    resp = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    prompt = AutoTokenizer.from_pretrained(llama_dir).decode(resp.json()["choices"][0]["prompt_token_ids"])
    assert "<tools>" in prompt and '"name": "get_weather"' in prompt
    rendered = json.dumps({"name": "get_weather", "arguments": json.loads(call.function.arguments)}, ensure_ascii=False)
    assert f"<tool_call>\n{rendered}\n</tool_call>" in prompt
    assert "<tool_response>\n22 degrees and sunny\n</tool_response>" in prompt


def test_response_format(client):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 150}},
              "required": ["name", "age"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
    resp = create(client, response_format=fmt, max_tokens=200)
    jsonschema.validate(json.loads(resp.choices[0].message.content), schema)
    assert resp.choices[0].finish_reason == "stop"
    resp = create(client, response_format={"type": "json_object"}, max_tokens=200)
    assert isinstance(json.loads(resp.choices[0].message.content), dict)
    stream = create(client, response_format=fmt, max_tokens=200, stream=True)
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in stream)), schema)


def test_structured_outputs_extra_body_on_both_routes(server, client):
    resp = create(client, extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert resp.choices[0].message.content in ("yes", "no")
    completion = httpx.post(f"{server.url}/v1/completions", json={
        "prompt": "The answer is", "max_tokens": 20, "structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}}).json()
    assert len(completion["choices"][0]["text"]) == 6 and completion["choices"][0]["text"][3] == "-"


def test_bad_tools_are_400(server):
    url = f"{server.url}/v1/chat/completions"
    body = {"messages": MESSAGES, "max_tokens": 4}
    assert_error(httpx.post(url, json={**body, "tools": TOOLS, "tool_choice": {
        "type": "function", "function": {"name": "get_stock"}}}), 400, "get_stock")
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                         "properties": {"x": {"type": 7}}}}}
    assert_error(httpx.post(url, json={**body, "tools": [bad]}), 400, "parameters")
    assert_error(httpx.post(url, json={**body, "tools": TOOLS, "tool_choice": "required",
                                       "response_format": {"type": "json_object"}}), 400, "cannot be combined")


def test_auto_needs_the_parser_flags(llama_dir):
    proc = ServerProcess(llama_dir, "--engine-placement", "thread",
                         sizes=("--dtype", "float32", "--max-model-len", "1024", "--num-kv-blocks", "256"))
    try:
        resp = httpx.post(f"{proc.url}/v1/chat/completions", json={"messages": MESSAGES, "tools": TOOLS})
        assert_error(resp, 400, "--enable-auto-tool-choice")
        resp = httpx.post(f"{proc.url}/v1/chat/completions", json={"messages": MESSAGES, "tools": TOOLS,
                                                                    "tool_choice": "required", "max_tokens": 300,
                                                                    "temperature": 0})
        assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["tool_calls"]
    finally:
        assert proc.stop() == 0


def test_prompt_logprobs_equal_transformers_and_are_not_streamed(server, llama_dir):
    import torch
    from transformers import AutoModelForCausalLM

    body = {"messages": [{"role": "user", "content": "The quick brown fox"}], "max_tokens": 2,
            "prompt_logprobs": 2, "return_token_ids": True}
    resp = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    ids = resp.json()["choices"][0]["prompt_token_ids"]
    prompt_logprobs = resp.json()["prompt_logprobs"]
    assert len(prompt_logprobs) == len(ids) and prompt_logprobs[0] is None
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        rows = model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
    for position, (entry, token) in enumerate(zip(prompt_logprobs[1:], ids[1:])):
        assert entry[str(token)]["logprob"] == pytest.approx(rows[position, token].item(), abs=1e-4)
        assert {e["rank"] for e in entry.values()} >= {1, 2}
    assert_error(httpx.post(f"{server.url}/v1/chat/completions", json={**body, "stream": True}, timeout=60), 400,
                 "prompt_logprobs")
