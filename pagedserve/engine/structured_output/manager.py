"""The engine core's grammar state, kept beside the scheduler: compiled grammars, one matcher per sample, and each
step's token bitmask.

It lives in the engine core, not the model runner, because a matcher follows exactly the tokens the core
accepts, and only the core knows which those are (stop checks, aborts, n > 1 samples, preemption: a preempted
request recomputes its tokens but keeps them, so its matcher stays where it was). The runner gets only the
bitmask, attached to the step's SchedulerOutput. The tokenizer is loaded on the first constrained request.
"""

import logging
import math
import threading
import time
from collections import OrderedDict
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from pagedserve.config import EngineConfig
from pagedserve.engine.request import Request, RequestStatus
from pagedserve.engine.structured_output.backend import GrammarBackend, GrammarMatcher
from pagedserve.engine.structured_output.backends import backend_class, choose_backend, constraint_digest
from pagedserve.model_executor.step import GrammarBitmask
from pagedserve.sampling_params import StructuredOutputsParams
from pagedserve.tokenizer import load_tokenizer

logger = logging.getLogger("pagedserve")

COMPILE_TIMEOUT_S = 60.0  # a request whose grammar takes longer fails (the compile itself cannot be stopped)
COMPILE_THREADS = 4
GRAMMAR_CACHE_SIZE = 64  # compiled grammars kept, least recently used out first (a JSON one: ~1 MB at 49k tokens)


class StructuredOutputManager:
    def __init__(self, config: EngineConfig, eos_token_ids: tuple[int, ...]) -> None:
        self.config = config
        self.eos_token_ids = eos_token_ids
        self.matchers: dict[str, GrammarMatcher] = {}  # by sample, from the moment its grammar is compiled
        self.compiling: dict[str, tuple[Request, Future, float]] = {}  # request, its compile, since when
        # (the constraint's digest, backend) -> its compile: the key is 32 bytes whatever the constraint's size
        self._grammars: OrderedDict[tuple[bytes, str], Future] = OrderedDict()
        self._backends: dict[str, GrammarBackend] = {}
        self._backends_lock = threading.Lock()
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self.vocab_size = 0  # the bitmask's width in bits, once the tokenizer is loaded
        self._bitmask: torch.Tensor | None = None  # [max_num_seqs, ceil(vocab_size / 32)], reused every step
        # Several compiles at once: one slow grammar (up to COMPILE_TIMEOUT_S) does not hold up every other one.
        self._compile_pool = ThreadPoolExecutor(COMPILE_THREADS, "grammar-compile")
        self._fill_pool = ThreadPoolExecutor(1, "grammar-bitmask")

    def validate(self, params: StructuredOutputsParams) -> str:
        """The backend for the constraint, or a ValueError naming what is wrong with it."""
        return choose_backend(params, self.config.structured_outputs_backend)

    def add_request(self, request: Request) -> None:
        """Compile the request's grammar in the background (or find it in the cache: a compile that failed is
        tried again); the request waits in the queue (WAITING_FOR_GRAMMAR) until `take_compiled` says so."""
        params = request.sampling_params.structured_outputs
        assert params is not None, "not a constrained request"
        key = (constraint_digest(params), self.validate(params))
        grammar = self._grammars.get(key)
        if grammar is None or (grammar.done() and grammar.exception() is not None):
            grammar = self._grammars[key] = self._compile_pool.submit(self._compile, params, key[1])
            if len(self._grammars) > GRAMMAR_CACHE_SIZE:
                self._grammars.popitem(last=False)
        self._grammars.move_to_end(key)
        self.compiling[request.request_id] = (request, grammar, time.monotonic())
        request.status = RequestStatus.WAITING_FOR_GRAMMAR

    def take_compiled(self) -> list[tuple[Request, str | None]]:
        """The waiting requests whose compile ended: (request, None) once each of its samples has its matcher,
        (request, error message) if it failed or took longer than COMPILE_TIMEOUT_S."""
        ended = []
        now = time.monotonic()
        for req_id, (request, grammar, since) in list(self.compiling.items()):
            if not grammar.done() and now - since < COMPILE_TIMEOUT_S:
                continue
            del self.compiling[req_id]
            error = None
            if not grammar.done():
                error = f"structured_outputs: the grammar did not compile within {COMPILE_TIMEOUT_S:.0f} s"
            elif grammar.exception() is not None:
                e = grammar.exception()
                error = str(e) if isinstance(e, ValueError) else f"structured_outputs: compiling failed: {e!r}"
            else:
                backend, compiled = grammar.result()
                for sample in [request, *request.pending_forks]:
                    self.matchers[sample.request_id] = backend.new_matcher(compiled)
            ended.append((request, error))
        return ended

    def wait_for_compile(self, timeout: float) -> None:
        """Block until some grammar is compiled, at most `timeout` s: an engine with nothing else to do waits
        here instead of spinning (and taking the CPU the compile needs)."""
        futures.wait([grammar for _, grammar, _ in self.compiling.values()], timeout, futures.FIRST_COMPLETED)

    def remove(self, request_id: str) -> None:
        self.matchers.pop(request_id, None)
        self.compiling.pop(request_id, None)

    def valid_draft(self, request_id: str, draft: list[int]) -> list[int]:
        """The longest start of a speculative draft the request's grammar takes (the rest could never be accepted:
        the mask forbids it), short of a stop token that ends the grammar (no position after it could be masked).
        The matcher is left where it was."""
        matcher = self.matchers[request_id]
        num_accepted = num_valid = 0
        for token_id in draft:
            if not matcher.accept_tokens([token_id]):
                break
            num_accepted += 1
            if matcher.is_terminated():
                break
            num_valid += 1
        if num_accepted:
            matcher.rollback(num_accepted)
        return draft[:num_valid]

    def start_bitmask(self, req_ids: list[str], drafts: dict[str, list[int]]) -> GrammarBitmask | None:
        """Start filling the bitmask of the constrained requests among `req_ids` (those that sample this step);
        None if there are none. A request with a draft gets a row per position: the tokens allowed after the
        drafts before it."""
        matchers = {req_id: self.matchers[req_id] for req_id in req_ids if req_id in self.matchers}
        if not matchers:
            return None
        rows, num_rows = {}, 0
        for req_id in matchers:
            rows[req_id], num_rows = num_rows, num_rows + 1 + len(drafts.get(req_id, ()))
        if self._bitmask is None or len(self._bitmask) < num_rows:
            width = math.ceil(self.vocab_size / 32)
            self._bitmask = torch.empty(max(self.config.max_num_seqs, num_rows), width, dtype=torch.int32)
        bitmask = self._bitmask[:num_rows]
        work = [(matcher, drafts.get(req_id, [])) for req_id, matcher in matchers.items()]
        return GrammarBitmask(rows, self._fill_pool.submit(_fill, work, bitmask))

    def _compile(self, params: StructuredOutputsParams, backend_name: str) -> tuple[GrammarBackend, Any]:
        backend = self._backend(backend_name)
        start = time.perf_counter()
        compiled = backend.compile(params)
        logger.debug("compiled a %s grammar with %s in %.1f ms", params.kind, backend_name,
                     (time.perf_counter() - start) * 1e3)
        return backend, compiled

    def _backend(self, name: str) -> GrammarBackend:
        with self._backends_lock:
            if name not in self._backends:
                tokenizer = self._tokenizer
                if tokenizer is None:
                    tokenizer = self._tokenizer = load_tokenizer(self.config)
                    # The logits may be wider than the tokenizer (a padded vocabulary): ids past it never pass.
                    self.vocab_size = max(self.config.hf_config.vocab_size, len(tokenizer))
                self._backends[name] = backend_class(name)(tokenizer, self.vocab_size, self.eos_token_ids)
            return self._backends[name]


def _fill(work: list[tuple[GrammarMatcher, list[int]]], bitmask: torch.Tensor) -> torch.Tensor:
    """Each matcher's rows: where it is, then after each token of its draft (valid: see valid_draft), which it
    then forgets again."""
    row = 0
    for matcher, draft in work:
        matcher.fill_bitmask(bitmask, row)
        for token_id in draft:
            matcher.accept_tokens([token_id])
            row += 1
            matcher.fill_bitmask(bitmask, row)
        if draft:
            matcher.rollback(len(draft))
        row += 1
    return bitmask
