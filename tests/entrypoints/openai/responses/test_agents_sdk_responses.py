"""The OpenAI Agents SDK with its default model class, OpenAIResponsesModel, against the server: an agent with
two function tools and an `output_type` calls a tool, gets its result back, and returns a valid object; once
with the SDK sending the whole history each turn (streamed), once chaining turns by previous_response_id."""

import asyncio
from typing import Annotated

import httpx
from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled
from openai import AsyncOpenAI
from pydantic import BaseModel, Field


class Report(BaseModel):
    city: str = Field(max_length=8)
    weather: str = Field(max_length=8)


def make_agent(client: AsyncOpenAI, model_name: str, calls: list[str]) -> Agent:
    @function_tool
    def get_weather(city: Annotated[str, Field(max_length=6)]) -> str:
        """The weather in a city."""
        calls.append(f"weather:{city}")
        return f"Sunny in {city}."

    @function_tool
    def get_time() -> str:
        """The local time."""
        calls.append("time")
        return "noon"

    model = OpenAIResponsesModel(model=model_name, openai_client=client)
    # tool_choice "required" on the first turn (the SDK resets it to auto once a tool ran); one call per turn
    settings = ModelSettings(tool_choice="required", parallel_tool_calls=False, temperature=0.0, max_tokens=110)
    return Agent(name="weather", instructions="Use the tools.", tools=[get_weather, get_time], model=model,
                 output_type=Report, model_settings=settings)


def check(result, calls: list[str]) -> None:
    assert len(calls) == 1, calls
    assert isinstance(result.final_output, Report)
    kinds = [item.type for item in result.new_items]
    assert kinds == ["tool_call_item", "tool_call_output_item", "message_output_item"]


def test_agent_with_tools_and_output_type(responses_server):
    set_tracing_disabled(True)  # the SDK would upload traces to OpenAI
    calls: list[str] = []
    client = AsyncOpenAI(base_url=f"{responses_server.url}/v1", api_key="agents", max_retries=0)
    model_name = httpx.get(f"{responses_server.url}/v1/models").json()["data"][0]["id"]
    agent = make_agent(client, model_name, calls)

    async def runs():  # one event loop: the client's connections belong to it
        streamed = Runner.run_streamed(agent, "What is the weather in Paris?", max_turns=4)
        kinds = {event.type async for event in streamed.stream_events()}
        assert "raw_response_event" in kinds
        check(streamed, calls)
        calls.clear()
        chained = await Runner.run(agent, "What is the weather in Paris?", max_turns=4, auto_previous_response_id=True)
        check(chained, calls)
        last = await client.responses.retrieve(chained.last_response_id)
        assert last.previous_response_id is not None and last.status == "completed"  # turn 2 named turn 1

    asyncio.run(runs())
