"""LLM: the offline, in-process front end, with vLLM's signature."""

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from tqdm import tqdm

from pagedserve.config import EngineArgs, create_engine_config
from pagedserve.core.engine_core import EngineCore, EngineCoreOutput
from pagedserve.frontend.tokenizer import IncrementalDetokenizer, load_tokenizer
from pagedserve.outputs import CompletionOutput, Logprob, RequestOutput
from pagedserve.sampling_params import SamplingParams

logger = logging.getLogger("pagedserve")

PromptType = str | dict


@dataclass
class _Sample:
    """One of a prompt's n samples as the front end tracks it."""

    index: int
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class LLM:
    def __init__(self, model: str | None = None, **kwargs) -> None:
        unknown = set(kwargs) - EngineArgs.field_names()
        if unknown:
            raise ValueError(f"unknown LLM arguments: {sorted(unknown)}")
        start = time.perf_counter()
        self.config = create_engine_config(EngineArgs(model=model, **kwargs))
        self.tokenizer = load_tokenizer(self.config)
        self.engine = EngineCore(self.config)
        self._next_id = 0
        logger.info("engine ready in %.1f s", time.perf_counter() - start)

    def get_tokenizer(self):
        return self.tokenizer

    def stats(self) -> dict:
        return self.engine.stats()

    def reset_prefix_cache(self) -> bool:
        return self.engine.reset_prefix_cache()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in input order."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = [sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams) else sampling_params
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        requests = [self._tokenize(p) for p in prompts]  # every prompt is validated before any runs
        return self._run(requests, list(params), use_tqdm)

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
                conversation, chat_template=chat_template, add_generation_prompt=add_generation_prompt,
                tokenize=False,
            )
            prompts.append({"prompt": text, "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm)

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
                raise ValueError("prompt_token_ids must be a list of ints")
            return prompt.get("prompt"), ids
        if isinstance(prompt, dict) and "prompt" in prompt:
            return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
        raise ValueError(f"a prompt is a string or a dict with 'prompt' or 'prompt_token_ids', got {prompt!r}")

    def _run(
        self, requests: list[tuple[str | None, list[int]]], params: list[SamplingParams], use_tqdm: bool
    ) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        samples: dict[str, tuple[RequestOutput, _Sample, SamplingParams]] = {}
        try:
            for (prompt, prompt_ids), sp in zip(requests, params):
                request_id = str(self._next_id)
                self._next_id += 1
                out = RequestOutput(request_id, prompt, prompt_ids, [], finished=False)
                outputs.append(out)
                for index in range(sp.n):
                    child = _child_params(sp, index)
                    sample = _Sample(index, IncrementalDetokenizer(self.tokenizer, child))
                    if child.logprobs is not None:
                        sample.logprobs, sample.cumulative_logprob = [], 0.0
                    child_id = request_id if sp.n == 1 else f"{index}_{request_id}"
                    self.engine.add_request(child_id, prompt_ids, child)
                    samples[child_id] = (out, sample, child)
        except ValueError:
            self.engine.abort_requests(list(samples))
            raise

        bar = tqdm(total=len(samples), desc="Generating", unit="seq", disable=not use_tqdm)
        num_output_tokens = 0
        start = time.perf_counter()
        while self.engine.has_unfinished_requests():
            for core_out in self.engine.step():
                num_output_tokens += len(core_out.new_token_ids)
                if self._apply(core_out, samples):
                    bar.update(1)
            if use_tqdm:
                bar.set_postfix_str(f"{num_output_tokens / (time.perf_counter() - start):.1f} tok/s", refresh=False)
        bar.close()

        for out in outputs:
            out.finished = True
        for out, sample, _ in samples.values():
            out.outputs.append(CompletionOutput(
                sample.index, sample.detokenizer.text, sample.token_ids, sample.cumulative_logprob,
                sample.logprobs, sample.finish_reason, sample.stop_reason,
            ))
        for out in outputs:
            out.outputs.sort(key=lambda c: c.index)
        return outputs

    def _apply(self, core_out: EngineCoreOutput, samples: dict) -> bool:
        """Fold one engine output into its sample; True when the sample has just finished."""
        _, sample, params = samples[core_out.request_id]
        if sample.finish_reason is not None:
            return False
        sample.token_ids += core_out.new_token_ids
        if core_out.new_logprobs is not None and sample.logprobs is not None:
            for entry in core_out.new_logprobs:
                sample.logprobs.append({
                    token_id: Logprob(lp, rank, self.tokenizer.decode([token_id]))
                    for token_id, (lp, rank) in entry.items()
                })
            sample.cumulative_logprob += sum(
                entry[t][0] for entry, t in zip(core_out.new_logprobs, core_out.new_token_ids)
            )
        new_token_ids = core_out.new_token_ids
        if core_out.finish_reason == "stop" and not params.include_stop_str_in_output:
            new_token_ids = new_token_ids[:-1]  # EOS / a stop token id is not part of the text (as vLLM)
        sample.detokenizer.add_tokens(new_token_ids)
        if core_out.finished:
            sample.detokenizer.flush()
        if sample.detokenizer.stop_string is not None:
            # A stop string ends the request in the front end; the core drops it and frees its blocks.
            if not core_out.finished:
                self.engine.abort_requests([core_out.request_id])
            sample.finish_reason, sample.stop_reason = "stop", sample.detokenizer.stop_string
            return True
        if core_out.finished:
            sample.finish_reason, sample.stop_reason = core_out.finish_reason, core_out.stop_reason
            if core_out.error:
                logger.error("request %s failed: %s", core_out.request_id, core_out.error)
            return True
        return False


def _child_params(params: SamplingParams, index: int) -> SamplingParams:
    """Sample `index` of an n > 1 request: n=1, and a distinct seed if the parent is seeded (as vLLM)."""
    if params.n == 1:
        return params
    child = params.clone()
    child.n = 1
    if child.seed is not None:
        child.seed += index
    return child
