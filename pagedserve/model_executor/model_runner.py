"""Runs one scheduled step: packs the flat batch, runs the model, samples. Makes no scheduling decisions."""

import logging
from dataclasses import dataclass, field

import torch

from pagedserve.config import EngineConfig
from pagedserve.core.scheduler import ScheduledRequest
from pagedserve.model_executor.attention import cpu_kernel
from pagedserve.model_executor.attention.torch_paged import AttentionMetadata
from pagedserve.model_executor.layers.sampler import Sampler, SamplingMetadata
from pagedserve.model_executor.loader import load_model

logger = logging.getLogger("pagedserve")

DEFAULT_CPU_KV_CACHE_BYTES = 4 << 30
# Logprob entry: token id -> (logprob, rank)
TokenLogprobs = dict[int, tuple[float, int]]


@dataclass
class ModelRunnerOutput:
    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)


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
        self.config = config
        self.device = config.device
        torch.manual_seed(config.seed)
        self.model = load_model(config)
        self.hf_config = config.hf_config
        self.block_size = config.block_size
        self.num_kv_blocks = self._num_kv_blocks()
        self.kv_caches = self._allocate_kv_cache()
        if self.device.type == "cpu":  # build (or load the cached) kernel now, not in the first step
            native = cpu_kernel.supports(torch.empty(0, dtype=self.config.dtype))
            logger.info("decode attention: %s", "native CPU kernel" if native else "PyTorch path")
        self.sampler = Sampler()
        self.generators: dict[str, torch.Generator] = {}

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
        return num_blocks

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

    def release(self, request_id: str) -> None:
        self.generators.pop(request_id, None)

    @torch.inference_mode()
    def copy_blocks(self, block_copies: list[tuple[int, int]]) -> None:
        """Copy-on-write as the scheduler decided: block src -> dst in every layer, before the step's forward."""
        src = torch.tensor([src for src, _ in block_copies], device=self.device)
        dst = torch.tensor([dst for _, dst in block_copies], device=self.device)
        for cache in self.kv_caches:  # [2, Hkv, num_blocks, block_size, D]
            cache.index_copy_(2, dst, cache.index_select(2, src))

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledRequest]) -> ModelRunnerOutput:
        query_lens = [s.num_new_tokens for s in scheduled]
        context_lens = [s.request.num_computed_tokens + s.num_new_tokens for s in scheduled]
        input_ids: list[int] = []
        for s, ctx in zip(scheduled, context_lens):
            input_ids += s.request.token_ids(s.request.num_computed_tokens, ctx)
        meta = AttentionMetadata.build(
            query_lens, context_lens, [s.request.num_prompt_tokens for s in scheduled],
            [s.block_ids for s in scheduled], self.block_size, self.device,
        )
        hidden = self.model(torch.tensor(input_ids, device=self.device), meta.positions, meta)

        sampling = [i for i, s in enumerate(scheduled) if s.samples]
        out = ModelRunnerOutput()
        if not sampling:
            return out
        ends = torch.cumsum(torch.tensor(query_lens), 0)
        last_rows = (ends - 1)[sampling].to(self.device)
        logits = self.model.compute_logits(hidden[last_rows])
        requests = [scheduled[i].request for i in sampling]
        metadata = SamplingMetadata.from_rows(
            [r.sampling_params for r in requests],
            [r.prompt_token_ids for r in requests],
            [r.output_token_ids for r in requests],
            [self._generator(r) for r in requests],
            [self._banned_token_ids(r) for r in requests],
            self.device,
        )
        result = self.sampler(logits, metadata)
        token_ids = result.sampled_token_ids.tolist()
        for request, token_id in zip(requests, token_ids):
            out.sampled_token_ids[request.request_id] = token_id
        if result.logprobs is not None:
            ids, logprobs = result.logprob_token_ids.tolist(), result.logprobs.tolist()
            ranks = result.sampled_token_ranks.tolist()
            for row, request in enumerate(requests):
                k = request.sampling_params.logprobs
                if k is None:
                    continue
                entry = {ids[row][0]: (logprobs[row][0], ranks[row])}
                for rank in range(1, k + 1):
                    entry.setdefault(ids[row][rank], (logprobs[row][rank], rank))
                out.logprobs[request.request_id] = entry
        return out

    def _generator(self, request) -> torch.Generator | None:
        seed = request.sampling_params.seed
        if seed is None:
            return None
        gen = self.generators.get(request.request_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(seed)
            self.generators[request.request_id] = gen
        return gen

    @staticmethod
    def _banned_token_ids(request) -> list[int]:
        """EOS and stop token ids may not be sampled before min_tokens are out."""
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            return []
        banned = list(params.stop_token_ids)
        if request.eos_token_id is not None:
            banned.append(request.eos_token_id)
        return banned
