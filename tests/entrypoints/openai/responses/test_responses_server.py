"""/v1/responses as clients see it: the official `openai` client (and raw httpx for bad input) against a real
server on a tiny random-weight checkpoint, where only the grammar makes an output valid."""

import json
import time

import httpx
import jsonschema
import openai
import pytest
from server_utils import assert_error

WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
                          "required": ["city"], "additionalProperties": False}}
CLOCK = {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {},
                                                                 "additionalProperties": False}}
TOOLS = [WEATHER, CLOCK]
CHAT_TOOLS = [{"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}} for tool in TOOLS]
YES_NO = {"structured_outputs": {"choice": ["yes", "no"]}}  # an output that completes in a few tokens


@pytest.fixture(scope="module")
def server(responses_server):
    return responses_server


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="alice", max_retries=0)


def model(client) -> str:
    return client.models.list().data[0].id


def chat_prompt_tokens(client, messages: list[dict], tools: list[dict] | None = None) -> int:
    extra = {"tools": tools, "tool_choice": "none"} if tools else {}
    return client.chat.completions.create(model=model(client), messages=messages, max_tokens=1,
                                          **extra).usage.prompt_tokens


def test_a_whole_response_is_chat_s_answer_and_is_stored(client):
    response = client.responses.create(model=model(client), input="Paged attention keeps", instructions="Be brief.",
                                       max_output_tokens=6, temperature=0, metadata={"run": "1"},
                                       extra_body={"ignore_eos": True})
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Paged attention keeps"}]
    chat = client.chat.completions.create(model=model(client), messages=messages, max_tokens=6, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant" and message.status == "incomplete"
    assert response.output_text == message.content[0].text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens and response.usage.output_tokens == 6
    assert response.usage.total_tokens == response.usage.input_tokens + 6
    assert response.metadata == {"run": "1"} and response.instructions == "Be brief." and response.store
    assert client.responses.retrieve(response.id).model_dump() == response.model_dump()


def test_streamed_events(client):
    with client.responses.stream(model=model(client), input="Is it sunny?", temperature=0, extra_body=YES_NO) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [event.type for event in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert final.status == "completed" and deltas == final.output_text and final.output_text in ("yes", "no")
    whole = client.responses.create(model=model(client), input="Is it sunny?", temperature=0, extra_body=YES_NO)
    assert whole.output_text == final.output_text
    stored = client.responses.retrieve(final.id)
    assert stored.status == "completed" and stored.output_text == final.output_text


def test_a_five_turn_chain_with_tools(server, client):
    """Each turn's prompt is the one chat renders for the whole conversation (function calls and their outputs
    included; earlier instructions not), from the store; the chain is an engine session, so later turns find
    their history's KV."""
    name = model(client)
    first = client.responses.create(model=name, input="What is the weather in Paris?", tools=TOOLS,
                                    instructions="Answer in French.",
                                    tool_choice="required", parallel_tool_calls=False, temperature=0,
                                    max_output_tokens=120)
    (call,) = first.output
    assert first.status == "completed" and call.type == "function_call" and call.call_id.startswith("call_")
    schema = {"get_weather": WEATHER, "get_time": CLOCK}[call.name]["parameters"]
    jsonschema.validate(json.loads(call.arguments), schema)
    history = [{"role": "user", "content": "What is the weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": call.call_id, "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments}}]},
               {"role": "tool", "tool_call_id": call.call_id, "content": "22 degrees and sunny"}]
    before = server.metrics()

    second = client.responses.create(model=name, previous_response_id=first.id, tools=TOOLS, tool_choice="none",
                                     input=[{"type": "function_call_output", "call_id": call.call_id,
                                             "output": "22 degrees and sunny"}], max_output_tokens=3, temperature=0)
    assert second.usage.input_tokens == chat_prompt_tokens(client, history, CHAT_TOOLS)  # no "Answer in French."
    history += [{"role": "assistant", "content": second.output_text}, {"role": "user", "content": "And the time?"}]

    with client.responses.stream(model=name, previous_response_id=second.id, input="And the time?", tools=TOOLS,
                                 tool_choice={"type": "function", "name": "get_time"}, max_output_tokens=60,
                                 temperature=0) as stream:
        kinds = [event.type for event in stream]
        third = stream.get_final_response()
    (clock,) = third.output
    assert clock.type == "function_call" and clock.name == "get_time" and json.loads(clock.arguments) == {}
    assert kinds.index("response.function_call_arguments.delta") < kinds.index(
        "response.function_call_arguments.done") < kinds.index("response.completed")
    assert third.usage.input_tokens == chat_prompt_tokens(client, history, CHAT_TOOLS)
    history += [{"role": "assistant", "content": None, "tool_calls": [
        {"id": clock.call_id, "type": "function", "function": {"name": "get_time", "arguments": clock.arguments}}]},
        {"role": "tool", "tool_call_id": clock.call_id, "content": "noon"}]

    fourth = client.responses.create(model=name, previous_response_id=third.id, tools=TOOLS, tool_choice="none",
                                     input=[{"type": "function_call_output", "call_id": clock.call_id,
                                             "output": "noon"}], max_output_tokens=3, temperature=0)
    assert fourth.usage.input_tokens == chat_prompt_tokens(client, history, CHAT_TOOLS)
    assert fourth.usage.input_tokens_details.cached_tokens >= 3 * 16  # the history's KV, kept by the session
    history += [{"role": "assistant", "content": fourth.output_text}, {"role": "user", "content": "Thanks!"}]

    fifth = client.responses.create(model=name, previous_response_id=fourth.id, input="Thanks!", tools=TOOLS,
                                    max_output_tokens=3, temperature=0)  # tool_choice auto: the hermes parser
    assert fifth.usage.input_tokens == chat_prompt_tokens(client, history, CHAT_TOOLS)
    assert fifth.previous_response_id == fourth.id
    after = server.metrics()
    assert after["pagedserve:lease_hit_tokens_total"] - before.get("pagedserve:lease_hit_tokens_total", 0) >= 64
    (item,) = client.responses.input_items.list(fourth.id).data
    assert item.type == "function_call_output" and item.call_id == clock.call_id and item.output == "noon"


def test_background_poll_resume_and_cancel(client):
    name = model(client)
    queued = client.responses.create(model=name, input="Is it sunny?", background=True, temperature=0,
                                     extra_body=YES_NO)
    assert queued.status == "queued" and queued.background
    done = poll(client, queued.id)
    assert done.status == "completed" and done.output_text in ("yes", "no")
    events = list(client.responses.retrieve(queued.id, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events))) and events[-1].type == "response.completed"
    resumed = list(client.responses.retrieve(queued.id, stream=True, starting_after=2))
    assert [e.sequence_number for e in resumed] == list(range(3, len(events)))
    with client.responses.stream(response_id=queued.id) as stream:  # the client's own resume helper
        assert stream.get_final_response().output_text == done.output_text

    long = client.responses.create(model=name, input="Tell me a story", background=True, max_output_tokens=400,
                                   extra_body={"ignore_eos": True})
    poll(client, long.id, until=("in_progress",))
    cancelled = client.responses.cancel(long.id)
    assert cancelled.status == "cancelled" and 0 < cancelled.usage.output_tokens < 400
    stored = client.responses.retrieve(long.id)
    assert stored.status == "cancelled" and client.responses.cancel(long.id).status == "cancelled"  # idempotent
    foreground = client.responses.create(model=name, input="hi", max_output_tokens=1)
    with pytest.raises(openai.BadRequestError, match="only background responses can be cancelled"):
        client.responses.cancel(foreground.id)

    # a background stream whose client leaves: the run goes on
    stream = client.responses.create(model=name, input="Is it?", background=True, stream=True, max_output_tokens=30,
                                     extra_body={"ignore_eos": True})
    first = next(iter(stream))
    stream.close()
    assert first.type == "response.created" and first.response.status == "queued"
    assert poll(client, first.response.id).usage.output_tokens == 30


def poll(client, response_id: str, until: tuple[str, ...] = ("completed", "incomplete", "failed", "cancelled"),
         timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.responses.retrieve(response_id)
        if response.status in until:
            return response
        time.sleep(0.05)
    raise AssertionError(f"{response_id} is still {response.status}")


def test_input_items_are_listed_as_openai_lists(client):
    response = client.responses.create(model=model(client), max_output_tokens=1, input=[
        {"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "three"}]}])
    newest = client.responses.input_items.list(response.id)
    assert [item.content[0].text for item in newest.data] == ["three", "two", "one"] and not newest.has_more
    page = client.responses.input_items.list(response.id, limit=2, order="asc")
    assert [item.content[0].text for item in page.data] == ["one", "two"] and page.has_more
    rest = client.responses.input_items.list(response.id, limit=2, order="asc", after=page.last_id)
    assert [item.content[0].text for item in rest.data] == ["three"] and not rest.has_more
    every = client.responses.input_items.list(response.id, limit=1)  # iterating fetches page after page
    assert [item.content[0].text for item in every] == ["three", "two", "one"]


def test_tenants_delete_and_store_false(server, client):
    name = model(client)
    mine = client.responses.create(model=name, input="mine", max_output_tokens=1)
    bob = openai.OpenAI(base_url=f"{server.url}/v1", api_key="bob", max_retries=0)
    for call in (lambda: bob.responses.retrieve(mine.id), lambda: bob.responses.cancel(mine.id),
                 lambda: bob.responses.delete(mine.id), lambda: bob.responses.input_items.list(mine.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.NotFoundError) as chained:
        bob.responses.create(model=name, input="x", previous_response_id=mine.id)
    assert chained.value.body["code"] == "previous_response_not_found"
    salted = client.responses.create(model=name, input="salted", max_output_tokens=1, extra_body={"cache_salt": "s"})
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(salted.id)
    assert client.responses.retrieve(salted.id, extra_query={"cache_salt": "s"}).id == salted.id

    client.responses.delete(mine.id)
    assert_error(httpx.get(f"{server.url}/v1/responses/{mine.id}", headers={"Authorization": "Bearer alice"}), 404,
                 mine.id)
    deleted = httpx.delete(f"{server.url}/v1/responses/{salted.id}", params={"cache_salt": "s"},
                           headers={"Authorization": "Bearer alice"})
    assert deleted.json() == {"id": salted.id, "object": "response", "deleted": True}
    unstored = client.responses.create(model=name, input="forget it", max_output_tokens=1, store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_logprobs(client):
    response = client.responses.create(model=model(client), input="Hi", max_output_tokens=4, top_logprobs=2,
                                       include=["message.output_text.logprobs"], extra_body={"ignore_eos": True})
    logprobs = response.output[0].content[0].logprobs
    assert len(logprobs) == 4 and all(len(lp.top_logprobs) == 2 and lp.logprob <= 0 for lp in logprobs)


def test_bad_requests_are_400_in_openai_shape(server):
    url = f"{server.url}/v1/responses"
    for body, fragment in (
        ({"input": []}, "input must not be empty"),
        ({"input": "x", "background": True, "store": False}, "needs store"),
        ({"input": "x", "include": ["reasoning.encrypted_content"]}, "not supported"),
        ({"input": "x", "top_logprobs": 2}, "needs include"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input_image"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "function_call_output items"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools"),
        ({"input": "x", "text": {"format": {"type": "json_schema", "name": "x"}}}, "needs a name and a schema"),
        ({"input": "x", "n": 2}, "n must be 1"),
        ({"input": "x", "response_format": {"type": "json_object"}}, "text.format"),
        ({"input": "x", "conversation": "conv_1"}, "previous_response_id"),
        ({"input": "x", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "nope"),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "x " * 1200}, "maximum context length"),
    ):
        assert_error(httpx.post(url, json=body, timeout=60), 400, fragment)
    assert_error(httpx.post(url, json={"input": "x", "model": "other"}), 404, "other")
    assert_error(httpx.post(url, json={"input": "x", "previous_response_id": "resp_nope"}), 404, "resp_nope")
    whole = httpx.post(url, json={"input": "x", "max_output_tokens": 1}).json()
    assert_error(httpx.get(f"{url}/{whole['id']}", params={"stream": "true"}), 400, "background")
    assert_error(httpx.get(f"{url}/{whole['id']}/input_items", params={"limit": 0}), 400, "limit")
    assert_error(httpx.get(f"{url}/{whole['id']}/input_items", params={"order": "up"}), 400, "order")
    assert_error(httpx.get(f"{url}/{whole['id']}", params={"starting_after": "x"}), 400, "starting_after")


def test_truncation_auto_drops_the_oldest_turns(server, client):
    name = model(client)
    long = "Paged attention keeps the KV cache in fixed-size blocks. " * 40
    first = client.responses.create(model=name, input=long, max_output_tokens=1)
    body = {"input": long, "previous_response_id": first.id, "max_output_tokens": 8}
    assert_error(httpx.post(f"{server.url}/v1/responses", json=body, headers={"Authorization": "Bearer alice"},
                            timeout=60), 400, "maximum context length")
    second = client.responses.create(model=name, truncation="auto", **body)
    assert second.status in ("completed", "incomplete") and second.usage.input_tokens < first.usage.input_tokens + 16
