"""Chat messages -> prompt through the chat template, shared by /v1/chat/completions and /v1/responses. Runs
on the text thread (Jinja and the tokenizer are slow for long histories)."""

from typing import Any

from pagedserve.frontend.engine_client import EngineClient

from .tool_calling import hermes_messages


def render_chat_prompt(engine: EngineClient, messages: list[dict], tools: list[dict], template: str | None,
                       add_generation_prompt: bool = True, continue_final_message: bool = False) -> dict:
    """`messages` as templates take them (ChatMessage.for_template), `tools` in chat's shape, `template` None for
    the tokenizer's. A template that cannot render tools gets them, past calls and results in the hermes
    format instead. {"prompt": text, "prompt_token_ids": ids}; ValueError if the template fails."""
    template_tools: list[Any] | None = tools or None
    uses_tools = tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
    if uses_tools and not template_renders_tools(engine, template):
        messages, template_tools = hermes_messages(messages, tools), None
    try:
        text = engine.tokenizer.apply_chat_template(
            messages, tools=template_tools, chat_template=template,
            add_generation_prompt=add_generation_prompt and not continue_final_message,
            continue_final_message=continue_final_message, tokenize=False,
        )
    except Exception as e:  # a template error (missing template, a message it cannot render) is the input's
        raise ValueError(f"the chat template could not render these messages: {e}") from e
    assert isinstance(text, str)
    return {"prompt": text, "prompt_token_ids": engine.input_processor.encode(text, add_special_tokens=False)}


def template_renders_tools(engine: EngineClient, template: str | None) -> bool:
    source = template if template is not None else engine.tokenizer.chat_template
    if isinstance(source, dict):  # named templates: transformers picks "tool_use" when tools are given
        return "tool_use" in source or any("tools" in t for t in source.values())
    return source is not None and "tools" in source
