"""LLM: the offline, in-process front end, with vLLM's signature."""

import logging
import time
from collections.abc import Sequence
from typing import Any, cast

from tqdm import tqdm

from pagedserve.config import EngineArgs, create_engine_config
from pagedserve.engine.core_loop import EngineLoop
from pagedserve.engine.engine_core import EngineCore
from pagedserve.engine.protocol import AbortRequests, AddRequest, EngineCoreRequest, EngineStats, StopSamples
from pagedserve.frontend.input_processor import InputProcessor, PromptType
from pagedserve.frontend.output_processor import OutputProcessor
from pagedserve.outputs import RequestOutput
from pagedserve.sampling_params import SamplingParams
from pagedserve.tokenizer import load_tokenizer

logger = logging.getLogger("pagedserve")


class LLM:
    def __init__(self, model: str | None = None, **kwargs) -> None:
        unknown = set(kwargs) - EngineArgs.field_names()
        if unknown:
            raise ValueError(f"unknown LLM arguments: {sorted(unknown)}")
        start = time.perf_counter()
        self.config = create_engine_config(EngineArgs(model=model, **kwargs))
        self.tokenizer = load_tokenizer(self.config)
        self.engine = EngineCore(self.config)
        self.loop = EngineLoop(self.engine)
        self.input_processor = InputProcessor(self.tokenizer, self.engine.limits)
        self._next_id = 0
        logger.info("engine ready in %.1f s", time.perf_counter() - start)

    def get_tokenizer(self):
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the checkpoint's generation_config.json defaults (as vLLM); used when
        `generate` gets none."""
        return SamplingParams(**cast(dict[str, Any], self.config.generation_defaults))

    def stats(self) -> EngineStats:
        """KV blocks total/free, running/waiting requests, preemptions, prefix-cache queries/hits."""
        return self.engine.stats()

    def reset_prefix_cache(self) -> bool:
        return self.engine.reset_prefix_cache()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
        session_ids: Sequence[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in input order.

        A prompt is text, or a dict with "prompt" (text) or "prompt_token_ids", and optionally "cache_salt"
        (requests with different salts never share prefix-cache blocks), "session_id" and "kv_retention_s" (an
        agent session: its KV is kept for its next request, see `EngineCore.add_request`). `priority` (vLLM's,
        lower first, with scheduling_policy="priority") and `session_ids` give one value per prompt.
        """
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params = [sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams) else sampling_params
        for name, values in (("sampling params", params), ("priority", priority), ("session_ids", session_ids)):
            if values is not None and len(values) != len(prompts):
                raise ValueError(f"got {len(prompts)} prompts but {len(values)} {name}")
        requests = []
        for i, (prompt, sp) in enumerate(zip(prompts, params)):  # all checked before any runs
            extra = prompt if isinstance(prompt, dict) else {}
            requests.append(self.input_processor.make_request(
                prompt, sp, str(self._next_id + i), cache_salt=extra.get("cache_salt"),
                session_id=session_ids[i] if session_ids is not None else extra.get("session_id"),
                kv_retention_s=extra.get("kv_retention_s"), priority=priority[i] if priority is not None else 0))
        self._next_id += len(requests)
        return self._run(requests, use_tqdm)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = []
        for conversation in conversations:
            text = self.tokenizer.apply_chat_template(
                cast(list[dict[str, str]], conversation), chat_template=chat_template,
                add_generation_prompt=add_generation_prompt, tokenize=False,
            )
            prompts.append({"prompt": text, "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm)

    def close_session(self, session_id: str, cache_salt: str | None = None) -> bool:
        """Release what the engine holds for the session (its kept KV); False if it knows no such session under
        this cache_salt (the one its prompts gave)."""
        return self.engine.close_session(session_id, cache_salt)

    def _run(self, requests: list[AddRequest], use_tqdm: bool) -> list[RequestOutput]:
        """Drive the engine with the server's own loop (EngineLoop), in this thread, until every request ends."""
        processor = OutputProcessor(self.tokenizer)
        states = [processor.add_request(r.request_id, r.prompt, r.prompt_token_ids, r.params) for r in requests]
        messages: list[EngineCoreRequest] = list(requests)
        bar = tqdm(total=len(states), desc="Generating", unit="req", disable=not use_tqdm)
        num_output_tokens = 0
        start = time.perf_counter()
        while messages or self.engine.has_unfinished_requests():
            out = self.loop.turn(messages)
            messages = []
            core_outputs = out.outputs if out is not None else []
            num_output_tokens += sum(len(o.new_token_ids) for o in core_outputs)
            processed = processor.process(core_outputs)
            if processed.to_abort:  # a stop string ended these samples in the front end
                messages.append(StopSamples(processed.to_abort))
            if processed.failed:  # handling their output failed in the front end
                messages.append(AbortRequests(processed.failed))
            for request_id, message in processed.errors:
                logger.error("request %s failed: %s", request_id, message)
            bar.update(len(processed.finished))
            if use_tqdm:
                bar.set_postfix_str(f"{num_output_tokens / (time.perf_counter() - start):.1f} tok/s", refresh=False)
        bar.close()
        return [state.output() for state in states]
