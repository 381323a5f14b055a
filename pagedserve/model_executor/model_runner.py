"""Runs one scheduled step: packs the flat batch, runs the model, samples. Makes no scheduling decisions.

Under tensor parallelism every rank runs one (executor/tensor_parallel.py) on its shard: all apply the same diffs and
run the same forward; rank 0 samples and the others take its ids."""

import logging
from dataclasses import dataclass

import numpy as np
import torch

from pagedserve.config import EngineConfig
from pagedserve.distributed.parallel_state import broadcast_sampled, min_across_ranks, tp_rank, tp_size
from pagedserve.model_executor.attention import cpu_kernel
from pagedserve.model_executor.attention.torch_paged import AttentionMetadata
from pagedserve.model_executor.layers.sampler import Sampler, SamplingMetadata, logprob_entry, token_logprobs
from pagedserve.model_executor.loader import load_model
from pagedserve.model_executor.step import GrammarBitmask, ModelRunnerOutput, SchedulerOutput, TokenLogprobs
from pagedserve.sampling_params import SamplingParams

logger = logging.getLogger("pagedserve")

DEFAULT_CPU_KV_CACHE_BYTES = 4 << 30
PROMPT_LOGPROBS_ROWS = 256  # prompt positions whose logits are made at once: [256, vocab] float32 at most


@dataclass
class CachedRequestState:
    """What the runner keeps of a request between steps (its row of the persistent batch)."""

    prompt_token_ids: list[int]
    output_token_ids: list[int]  # the runner appends what it samples
    sampling_params: SamplingParams
    num_computed_tokens: int
    row: int  # its row of the runner's block table

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """The tokens at [start, end) without building the whole list (a decode step needs one token)."""
        num_prompt = len(self.prompt_token_ids)
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt : end - num_prompt]
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - num_prompt]


def available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        if config.tensor_parallel_size != tp_size():  # the model's layers are built for the group in place
            raise ValueError(f"tensor_parallel_size={config.tensor_parallel_size} needs a group of that size; "
                             f"this process is in one of {tp_size()} (one tensor-parallel engine per process)")
        self.config = config
        self.device = config.device
        torch.manual_seed(config.seed)
        self.model = load_model(config)
        self.hf_config = config.hf_config
        self.block_size = config.block_size
        self.num_kv_blocks = self._num_kv_blocks()
        self.kv_caches = self._allocate_kv_cache()
        if self.device.type == "cpu":  # build (or load the cached) kernels now, not in the first step
            native = cpu_kernel.supports(torch.empty(0, dtype=self.config.dtype))
            head_dim = self.model.attention_layers()[0].head_dim
            path = f"native CPU kernel ({cpu_kernel.kernel_path(head_dim)} loop)" if native else "PyTorch path"
            amx = cpu_kernel.supports_prefill(torch.empty(1, 1, head_dim, dtype=self.config.dtype), self.block_size)
            logger.info("decode attention: %s; prefill attention: %s", path, "AMX kernel" if amx else "PyTorch SDPA")
        self.sampler = Sampler()
        self.requests: dict[str, CachedRequestState] = {}  # the persistent batch, by request id
        # Every request's block table is a row of one preallocated array, updated by the per-step diffs: a step's
        # tables are then one index operation, not lists padded and converted.
        self.block_table = np.zeros(
            (config.max_num_seqs, -(-config.max_model_len // self.block_size)), dtype=np.int64
        )
        self.free_rows = list(range(config.max_num_seqs))[::-1]
        self.generators: dict[str, torch.Generator] = {}  # seeded requests' own generators

    def close(self) -> None:
        """Nothing to release here (a TensorParallelExecutor, in its place, stops its workers)."""

    def kv_bytes_per_block(self) -> int:
        attn = self.model.attention_layers()[0]
        per_layer = 2 * self.block_size * attn.num_kv_heads * attn.head_dim * self.config.dtype.itemsize
        return per_layer * len(self.model.attention_layers())

    def _num_kv_blocks(self) -> int:
        if self.config.num_kv_blocks:
            return self.config.num_kv_blocks
        budget = self.config.kv_cache_memory_bytes
        if budget is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free * 0.8)
            else:  # a share of free RAM, as vLLM's CPU backend reserves a fixed KV space
                budget = min(DEFAULT_CPU_KV_CACHE_BYTES, available_memory_bytes() // 4)
        num_blocks = budget // self.kv_bytes_per_block()
        if num_blocks <= 0:
            raise ValueError(
                f"kv_cache_memory_bytes={budget} holds no block of {self.kv_bytes_per_block()} bytes"
            )
        return min_across_ranks(num_blocks, self.device)  # every rank holds every block (its heads of it)

    def _allocate_kv_cache(self) -> list[torch.Tensor]:
        caches = []
        for attn in self.model.attention_layers():
            # zeros, not empty: padded slots are read (then masked) and garbage could hold NaN
            cache = torch.zeros(
                2, attn.num_kv_heads, self.num_kv_blocks, self.block_size, attn.head_dim,
                dtype=self.config.dtype, device=self.device,
            )
            attn.kv_cache = cache
            caches.append(cache)
        num_tokens = self.num_kv_blocks * self.block_size
        nbytes = self.num_kv_blocks * self.kv_bytes_per_block()
        logger.info(
            "KV cache: %d blocks of %d tokens = %d tokens, %.2f GiB (%s)",
            self.num_kv_blocks, self.block_size, num_tokens, nbytes / 2**30, str(self.config.dtype).split(".")[-1],
        )
        return caches

    def update_states(self, sched: SchedulerOutput) -> None:
        """Apply the step's diffs to the persistent batch: forget finished and preempted requests, take new
        ones, extend block tables; then do the step's copy-on-write block copies."""
        for req_id in sched.finished_req_ids:
            self._forget(req_id)
            self.generators.pop(req_id, None)
        for req_id in sched.preempted_req_ids:  # back later as a new request; its generator goes on
            self._forget(req_id)
        for new in sched.new_requests:
            if not self.free_rows:  # more requests than max_num_seqs at once: grow the table
                self.free_rows = list(range(2 * len(self.block_table) - 1, len(self.block_table) - 1, -1))
                self.block_table = np.concatenate([self.block_table, np.zeros_like(self.block_table)])
            state = CachedRequestState(new.prompt_token_ids, list(new.output_token_ids), new.sampling_params,
                                       new.num_computed_tokens, self.free_rows.pop())
            self.requests[new.req_id] = state
            self._write_blocks(state.row, 0, new.block_ids)
        for cached in sched.cached_requests:
            state = self.requests[cached.req_id]
            state.num_computed_tokens = cached.num_computed_tokens
            if cached.new_block_ids:
                self._write_blocks(state.row, cached.block_table_start, cached.new_block_ids)
        if sched.block_copies:
            self.copy_blocks(sched.block_copies)

    def _forget(self, req_id: str) -> None:
        state = self.requests.pop(req_id, None)
        if state is not None:
            self.free_rows.append(state.row)

    def _write_blocks(self, row: int, start: int, block_ids: list[int]) -> None:
        end = start + len(block_ids)
        if end > self.block_table.shape[1]:  # cannot happen within max_model_len; widen rather than fail
            self.block_table = np.pad(self.block_table, ((0, 0), (0, end - self.block_table.shape[1])))
        self.block_table[row, start:end] = block_ids

    @torch.inference_mode()
    def copy_blocks(self, block_copies: list[tuple[int, int]]) -> None:
        """Copy-on-write as the scheduler decided: block src -> dst in every layer, before the step's forward."""
        src = torch.tensor([src for src, _ in block_copies], device=self.device)
        dst = torch.tensor([dst for _, dst in block_copies], device=self.device)
        for cache in self.kv_caches:  # [2, Hkv, num_blocks, block_size, D]
            cache.index_copy_(2, dst, cache.index_select(2, src))

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, req_ids: list[str]) -> ModelRunnerOutput:
        """Run the step for `req_ids` (all of the step's requests, or a subset when the engine core retries a
        failed step without the request that broke it). Sampled tokens are appended only once all went well."""
        states = [self.requests[req_id] for req_id in req_ids]
        query_lens = [sched.num_scheduled_tokens[req_id] for req_id in req_ids]
        context_lens = [s.num_computed_tokens + n for s, n in zip(states, query_lens)]
        drafts = [sched.spec_token_ids.get(req_id, []) for req_id in req_ids]
        input_ids: list[int] = []
        for state, ctx, draft in zip(states, context_lens, drafts):
            input_ids += state.token_ids(state.num_computed_tokens, ctx - len(draft)) + draft
        table_rows = np.fromiter((s.row for s in states), dtype=np.int64, count=len(states))
        block_tables = self.block_table[table_rows, : -(-max(context_lens) // self.block_size)]
        meta = AttentionMetadata.build(
            query_lens, context_lens, [len(s.prompt_token_ids) for s in states], block_tables, self.block_size,
            self.device, [bool(draft) for draft in drafts] if sched.spec_token_ids else None,
        )
        hidden = self.model(torch.tensor(input_ids, device=self.device), meta.positions, meta)
        out = ModelRunnerOutput()
        self._prompt_logprobs(hidden, req_ids, states, query_lens, out)

        # Requests whose chunk reaches their last token: its logits give the next token. With a draft, so do the
        # logits at each drafted token, given the drafts before it: one row per position, each sampled as if
        # the drafts before it had been sampled; a draft stands while it is what its row sampled.
        sampling = [i for i, (state, ctx, draft) in enumerate(zip(states, context_lens, drafts))
                    if ctx - len(draft) == state.num_tokens]
        if not sampling:
            return out
        ends = np.cumsum(query_lens)
        logits_rows = np.concatenate([np.arange(ends[i] - 1 - len(drafts[i]), ends[i]) for i in sampling])
        logits = self.model.compute_logits(hidden[torch.from_numpy(logits_rows).to(self.device)])  # rank 0's
        sampled_ids = [req_ids[i] for i in sampling]
        rows = [states[i] for i in sampling]
        sample_drafts = [drafts[i] for i in sampling]
        if tp_rank() > 0:
            row_token_ids = self._receive_sampled(len(logits_rows))
        else:
            generator_states = self._seeded_generator_states(sampled_ids, rows, sample_drafts)
            row_token_ids = self._sample_and_share(logits, sched, sampled_ids, rows, sample_drafts, out)
        first_row = 0
        for req_id, state, draft in zip(sampled_ids, rows, sample_drafts):
            token_ids = accepted_tokens(row_token_ids[first_row : first_row + len(draft) + 1], draft)
            first_row += len(draft) + 1
            state.output_token_ids += token_ids
            out.sampled_token_ids[req_id] = token_ids
            if tp_rank() == 0 and req_id in generator_states:
                self._rewind_generator(req_id, generator_states[req_id], len(token_ids), logits.shape[-1])
        return out

    def _prompt_logprobs(self, hidden: torch.Tensor, req_ids: list[str], states: list[CachedRequestState],
                         query_lens: list[int], out: ModelRunnerOutput) -> None:
        """Logprobs of the prompt tokens this step's chunks predict, for the requests that asked: the hidden row at
        position q gives token q + 1's. Logits are made PROMPT_LOGPROBS_ROWS rows at a time (never the whole
        prompt x vocabulary); every rank makes them (the vocabulary gather is collective), rank 0 keeps them."""
        start = 0
        for req_id, state, query_len in zip(req_ids, states, query_lens):
            k = state.sampling_params.prompt_logprobs
            first, end = state.num_computed_tokens, state.num_computed_tokens + query_len
            start, row = start + query_len, start
            last = min(end, len(state.prompt_token_ids) - 1)  # positions first..last-1 predict prompt tokens
            if k is None or first >= last:
                continue
            entries: list[TokenLogprobs] = []
            for q in range(first, last, PROMPT_LOGPROBS_ROWS):
                q_end = min(q + PROMPT_LOGPROBS_ROWS, last)
                logits = self.model.compute_logits(hidden[row + q - first : row + q_end - first])
                if tp_rank() == 0:
                    targets = torch.tensor(state.prompt_token_ids[q + 1 : q_end + 1], device=self.device)
                    entries += token_logprobs(logits, targets, k)
            if tp_rank() == 0:
                out.prompt_logprobs[req_id] = (first + 1, entries)

    def _sample_and_share(self, logits: torch.Tensor, sched: SchedulerOutput, sampled_ids: list[str],
                          rows: list[CachedRequestState], drafts: list[list[int]], out: ModelRunnerOutput) -> list[int]:
        """Sample (rank 0); under tensor parallelism, send the ids to the other ranks, or -1s if sampling failed."""
        try:
            token_ids = self._sample(logits, sched, sampled_ids, rows, drafts, out)
        except Exception:
            if tp_size() > 1:
                broadcast_sampled(torch.full((logits.shape[0],), -1, dtype=torch.int64, device=self.device))
            raise
        if tp_size() > 1:
            broadcast_sampled(torch.tensor(token_ids, dtype=torch.int64, device=self.device))
        return token_ids

    def _receive_sampled(self, num_rows: int) -> list[int]:
        """A worker rank's share of the step's sampling: rank 0's ids."""
        token_ids = broadcast_sampled(torch.empty(num_rows, dtype=torch.int64, device=self.device)).tolist()
        if token_ids[0] < 0:
            raise RuntimeError("rank 0 failed to sample this step")
        return token_ids

    def _sample(self, logits: torch.Tensor, sched: SchedulerOutput, sampled_ids: list[str],
                rows: list[CachedRequestState], drafts: list[list[int]], out: ModelRunnerOutput) -> list[int]:
        """The sampled id of each logits row (a request's, then one per drafted token), and their logprobs into
        `out`. A drafted position samples as if the drafts before it were the request's output (penalties see them;
        a seeded request's generator draws for its positions in order)."""
        row_ids, params, prompts, outputs, generators = [], [], [], [], []
        for req_id, state, draft in zip(sampled_ids, rows, drafts):
            generator = self._generator(req_id, state.sampling_params.seed)
            for position in range(len(draft) + 1):
                row_ids.append(req_id)
                params.append(state.sampling_params)
                prompts.append(state.prompt_token_ids)
                outputs.append(state.output_token_ids + draft[:position] if position else state.output_token_ids)
                generators.append(generator)
        metadata = SamplingMetadata.from_rows(
            params, prompts, outputs, generators, [sched.banned_token_ids.get(req_id, []) for req_id in row_ids],
            self.device,
        )
        if sched.grammar_bitmask is not None:
            self._add_grammar_bitmask(metadata, sched.grammar_bitmask, row_ids)
        result = self.sampler(logits, metadata)
        token_ids = result.sampled_token_ids.tolist()
        if result.logprobs is not None:
            assert result.logprob_token_ids is not None and result.sampled_token_ranks is not None
            ids, logprobs = result.logprob_token_ids.tolist(), result.logprobs.tolist()
            ranks = result.sampled_token_ranks.tolist()
            for row, (req_id, row_params) in enumerate(zip(row_ids, params)):
                k = row_params.logprobs
                if k is not None:
                    out.logprobs.setdefault(req_id, []).append(logprob_entry(ids[row], logprobs[row], ranks[row], k))
        return token_ids

    def _seeded_generator_states(self, sampled_ids: list[str], rows: list[CachedRequestState],
                                 drafts: list[list[int]]) -> dict[str, torch.Tensor]:
        """The generator state, before sampling, of each seeded random request with a draft (see _rewind_generator)."""
        return {req_id: self._generator(req_id, state.sampling_params.seed).get_state()  # type: ignore[union-attr]
                for req_id, state, draft in zip(sampled_ids, rows, drafts)
                if draft and state.sampling_params.seed is not None and not state.sampling_params.is_greedy}

    def _rewind_generator(self, req_id: str, state: torch.Tensor, num_tokens: int, vocab_size: int) -> None:
        """Leave a seeded request's generator as if it had sampled its `num_tokens` new tokens one step at a time
        (one [vocab] draw each), not also the rejected positions: its output is then the same with drafts as without."""
        generator = self.generators[req_id]
        generator.set_state(state)
        for _ in range(num_tokens):
            torch.empty(vocab_size, device=self.device).uniform_(generator=generator)

    def _add_grammar_bitmask(
        self, metadata: SamplingMetadata, grammar: GrammarBitmask, sampled_ids: list[str]
    ) -> None:
        """The bitmask rows of the constrained requests among this batch's sampling rows (`sampled_ids`: each row's
        request; a request with a draft has one row per position, and so has its bitmask); waits for the engine
        core's fill (it ran during the forward)."""
        rows, bitmask_rows, position = [], [], 0
        for row, req_id in enumerate(sampled_ids):
            position = position + 1 if row and sampled_ids[row - 1] == req_id else 0
            if req_id in grammar.rows:
                rows.append(row)
                bitmask_rows.append(grammar.rows[req_id] + position)
        if rows:
            bitmask = grammar.tensor()[bitmask_rows]
            metadata.grammar_bitmask = bitmask.to(self.device, non_blocking=True)
            metadata.grammar_rows = rows

    def _generator(self, req_id: str, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        gen = self.generators.get(req_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(seed)
            self.generators[req_id] = gen
        return gen


def accepted_tokens(row_token_ids: list[int], draft: list[int]) -> list[int]:
    """A request's new tokens from what its rows sampled: the drafted tokens up to the first its row did not
    sample, then that row's token. Each row sampled from the target's distribution given the tokens before it, so
    the output is distributed as the target's alone (for a draft of one fixed token x this is speculative sampling:
    x stands with probability p(x); otherwise the row's token is drawn from p without x)."""
    num_accepted = 0
    while num_accepted < len(draft) and row_token_ids[num_accepted] == draft[num_accepted]:
        num_accepted += 1
    return draft[:num_accepted] + [row_token_ids[num_accepted]]
