"""A real agent framework as a client: the OpenAI Agents SDK runs a tool loop against `pagedserve serve` on the
default model (SmolLM2-135M-Instruct), as `make serve` starts it: a required tool call, then a final answer."""

import asyncio

from agents import (
    Agent,
    ModelSettings,
    OpenAIChatCompletionsModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from openai import AsyncOpenAI
from server_utils import ServerProcess


def test_agents_sdk_two_step_tool_loop():
    set_tracing_disabled(True)  # the SDK would upload traces to OpenAI
    cities: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        cities.append(city)
        return f"It is sunny and 22 degrees Celsius in {city}."

    proc = ServerProcess(None, "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                         sizes=("--max-model-len", "2048", "--num-kv-blocks", "256"))
    try:
        client = AsyncOpenAI(base_url=f"{proc.url}/v1", api_key="unused", max_retries=0)
        model = OpenAIChatCompletionsModel(model="SmolLM2-135M-Instruct", openai_client=client)
        agent = Agent(
            name="weather", instructions="You answer questions about the weather. Use the tools.",
            tools=[get_weather], model=model,
            # required on the first turn; the SDK resets it to auto once a tool ran (reset_tool_choice)
            model_settings=ModelSettings(tool_choice="required", temperature=0.0, max_tokens=64),
        )
        result = asyncio.run(Runner.run(agent, "What is the weather in Paris?", max_turns=4))
        assert cities, "the agent never called the tool"
        assert isinstance(result.final_output, str) and result.final_output.strip()
        kinds = [item.type for item in result.new_items]
        assert kinds.index("tool_call_item") < kinds.index("tool_call_output_item") < kinds.index(
            "message_output_item")
    finally:
        assert proc.stop() == 0
