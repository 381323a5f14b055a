"""The stream events a response's output makes, their numbering and resumption, and a failure after the stream
started: a response.failed event that closes what was open, never a broken stream."""

import asyncio

from pagedserve.entrypoints.openai.responses.events import EventLog, OutputBuilder
from pagedserve.entrypoints.openai.responses.protocol import ResponsesRequest
from pagedserve.entrypoints.openai.responses.serving_responses import ResponseRun
from pagedserve.entrypoints.openai.serving import Admitted, ServingOptions
from pagedserve.entrypoints.openai.tool_calling import ToolPlan
from pagedserve.frontend.async_llm import EngineDeadError
from pagedserve.outputs import CompletionOutput, RequestOutput
from pagedserve.sampling_params import SamplingParams


def test_text_then_calls_make_items_and_events():
    log = EventLog()
    output = OutputBuilder(log, with_logprobs=False)
    output.add_text("Let me ", None)
    output.add_text("check.", None)
    output.add_calls([{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}},
                      {"index": 0, "function": {"arguments": '{"x": '}}])
    output.add_calls([{"index": 0, "function": {"arguments": "1}"}},
                      {"index": 1, "id": "call_2", "type": "function", "function": {"name": "g", "arguments": "{}"}}])
    output.finish("completed")
    assert [e["type"] for e in log.events] == [
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done", "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done"]
    assert [e["sequence_number"] for e in log.events] == list(range(len(log.events)))
    message, first, second = output.items
    assert message["content"][0]["text"] == output.text == "Let me check." and message["status"] == "completed"
    assert (first["call_id"], first["name"], first["arguments"], first["status"]) == ("call_1", "f", '{"x": 1}',
                                                                                      "completed")
    assert [e["output_index"] for e in log.events if e["type"] == "response.output_item.added"] == [0, 1, 2]
    added = log.events[0]["item"]
    assert added["status"] == "in_progress" and added["content"] == []  # a snapshot, not the item as it grew
    done = [e for e in log.events if e["type"] == "response.function_call_arguments.done"]
    assert [(e["name"], e["arguments"]) for e in done] == [("f", '{"x": 1}'), ("g", "{}")]
    assert second["id"].startswith("fc_") and second["id"] != first["id"]


def test_an_empty_output_is_one_empty_message():
    output = OutputBuilder(EventLog(), with_logprobs=True)
    output.finish("incomplete")
    (message,) = output.items
    assert message["status"] == "incomplete" and message["content"][0] == {
        "type": "output_text", "text": "", "annotations": [], "logprobs": []}


def test_followers_resume_after_any_sequence_number():
    async def scenario():
        log = EventLog()
        log.emit("response.created")
        log.emit("response.in_progress")
        seen: dict[str, list[int]] = {"all": [], "late": []}

        async def follow(name, starting_after):
            async for event in log.follow(starting_after):
                seen[name].append(event["sequence_number"])

        tasks = [asyncio.create_task(follow("all", None)), asyncio.create_task(follow("late", 1))]
        await asyncio.sleep(0)
        log.emit("response.output_item.added")
        terminal = log.number("response.completed")  # numbered, published once stored
        await asyncio.sleep(0)
        assert not any(task.done() for task in tasks)
        log.publish(terminal)
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        return seen

    assert asyncio.run(scenario()) == {"all": [0, 1, 2, 3], "late": [2, 3]}


class _Serving:
    """What a ResponseRun uses of ResponsesServing."""

    model_name = "m"
    owner = "here"
    options = ServingOptions("m")

    def __init__(self) -> None:
        self.runs: dict = {}
        self.aborted: list[str] = []

    def abort(self, admitted: Admitted) -> None:
        self.aborted += admitted.engine_ids


def test_an_engine_failure_mid_stream_is_a_failed_event():
    async def outputs():
        yield RequestOutput("resp_1", None, [1, 2], [CompletionOutput(0, "Hello", [5], None, None)], False)
        raise EngineDeadError("the engine is not running: killed")

    async def scenario():
        serving = _Serving()
        request = ResponsesRequest(input="hi", store=False, stream=True)
        admitted = Admitted("resp_1", [{"prompt": "p", "prompt_token_ids": [1, 2]}], [SamplingParams()],
                            [outputs()], ["resp_1"])
        run = ResponseRun(serving, request, admitted, ToolPlan("none", []), "tenant", [])  # type: ignore[arg-type]
        final = await run.execute()
        return serving, run, final

    serving, run, final = asyncio.run(scenario())
    kinds = [e["type"] for e in run.log.events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.failed"
    assert "response.output_item.done" in kinds  # the partial message is closed, as incomplete
    assert final["status"] == "failed" and final["error"] == {"code": "server_error",
                                                              "message": "the engine is not running: killed"}
    assert final["output"][0]["status"] == "incomplete" and final["output_text"] == "Hello"
    assert serving.aborted == ["resp_1"] and run.log.finished
