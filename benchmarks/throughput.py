"""Offline throughput of pagedserve vs transformers, the roofline, KV-cache waste, start-up and an MoE model.

    python benchmarks/throughput.py [--output BENCHMARKS.md] [--quick] [--only moe]

Everything but the MoE row runs on the default model (SmolLM2-135M-Instruct, GGUF); the MoE row runs a
random-weight Qwen3-MoE at a scaled-down Qwen3-30B-A3B shape. All on this machine's CPU. Tables go to
stdout as Markdown and, with --output, into that file's `throughput` section (or `moe` with --only moe;
other sections belong to other benchmark scripts, see report.py). --quick shrinks every size
so a run takes a minute or two; its numbers are for checking the script, not for quoting. --only moe
runs just the MoE comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch
from common import (
    DTYPES,
    QUIET_OTHER_CORES,
    ModelCost,
    OtherLoadMeter,
    copy_bandwidth,
    fmt,
    log,
    machine_description,
    markdown_table,
    matmul_flops,
    pct,
    wait_for_quiet,
)
from report import replace_section

from pagedserve import LLM, SamplingParams
from pagedserve.engine.protocol import AddRequest, EngineStats
from pagedserve.gguf_file import load_gguf_config
from pagedserve.model_executor.gguf_weights import iter_gguf_tensors
from pagedserve.model_files import default_model_path, is_gguf_file
from pagedserve.tokenizer import load_gguf_tokenizer

HF_CACHE_DIR = os.path.expanduser("~/.cache/pagedserve/bench")


@dataclass(frozen=True)
class Settings:
    prompt_len: int = 128
    output_len: int = 128
    batch_sizes: tuple[int, ...] = (1, 16, 64, 256)
    dtypes: tuple[str, ...] = ("bfloat16", "float32")
    hf_single_requests: int = 2  # transformers one at a time: this many requests, back to back
    hf_batch_sizes: tuple[int, ...] = (16, 64, 256)
    max_model_len: int = 2048
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    waste_requests: int = 64
    waste_min_len: int = 10  # prompt and output lengths: uniform in [min, max], each
    waste_max_len: int = 1000
    waste_max_model_len: int = 2048
    startup_runs: int = 3
    matmul_n: int = 2048
    copy_mib: int = 1024
    moe_dtype: str = "bfloat16"
    moe_prompt_len: int = 128
    moe_output_len: int = 32  # shorter than the dense runs: transformers decodes this model at a few tok/s here
    moe_batch_sizes: tuple[int, ...] = (1, 16, 64)
    moe_hf_batch_sizes: tuple[int, ...] = (16, 64)
    seed: int = 0
    quick: bool = False

    @classmethod
    def quick_settings(cls) -> Settings:
        return cls(
            quick=True, prompt_len=16, output_len=16, batch_sizes=(1, 4), hf_single_requests=2,
            hf_batch_sizes=(4,),
            waste_requests=8, waste_min_len=10, waste_max_len=100, waste_max_model_len=256,
            startup_runs=1, matmul_n=1024, copy_mib=256, moe_batch_sizes=(1, 4), moe_hf_batch_sizes=(4,),
            moe_prompt_len=16, moe_output_len=16,
        )

    def sampling(self) -> SamplingParams:
        return SamplingParams(max_tokens=self.output_len, ignore_eos=True, temperature=0)


@dataclass
class RunResult:
    """One timed generation: `num_requests` requests, `batch` of them per generate call."""

    engine: str
    dtype: str
    batch: int
    num_requests: int
    output_tokens: int
    seconds: float
    preemptions: int | None = None
    token_ids: list[list[int]] = field(default_factory=list, repr=False)
    machine: str = ""  # the rest of the machine during the run (MachineLoad.label)

    @property
    def tok_s(self) -> float:
        return self.output_tokens / self.seconds


@dataclass
class Roofline:
    dtype: str
    matmul_flops: float
    bandwidth: float  # bytes/s
    decode_bytes_per_token: float
    flops_per_token: float

    @property
    def decode_limit_tok_s(self) -> float:
        return self.bandwidth / self.decode_bytes_per_token


@dataclass
class WasteResult:
    num_requests: int
    steps: int
    seconds: float
    output_tokens: int
    preemptions: int
    peak_running: int
    pool_slots: int
    max_model_len: int
    used: int = 0  # the sums below run over every (step, running request)
    paged: int = 0
    reserve_max_len: int = 0
    reserve_request: int = 0

    @staticmethod
    def waste(used: int, allocated: int) -> float:
        return 1 - used / allocated if allocated else 0.0


@dataclass
class StartupResult:
    interpreter: float  # launch -> first line of the child's code
    imports: float  # import pagedserve
    engine_init: float  # LLM()
    first_token: float  # generate(max_tokens=1)

    @property
    def total(self) -> float:
        return self.interpreter + self.imports + self.engine_init + self.first_token

    @property
    def engine(self) -> float:
        return self.engine_init + self.first_token


# ----------------------------------------------------------------------------------------------------------
# Workload
# ----------------------------------------------------------------------------------------------------------


def random_prompts(count: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Fixed-seed random token ids, clear of the low ids where the special tokens live."""
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab_size) for _ in range(length)] for _ in range(count)]


def common_prefix_fraction(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean share of each output that two engines agree on before their first differing token.

    Compares the outputs of the prompts both ran (transformers' one-at-a-time run may cover more).
    """
    fractions = []
    for x, y in zip(a, b, strict=False):
        n = next((i for i, (u, v) in enumerate(zip(x, y, strict=False)) if u != v), min(len(x), len(y)))
        fractions.append(n / max(len(x), 1))
    return sum(fractions) / len(fractions) if fractions else float("nan")


def quiet_meter(s: Settings) -> OtherLoadMeter:
    """Wait (bounded) for the rest of the machine to be quiet, then start measuring what it uses."""
    wait_for_quiet(10 if s.quick else 300)
    return OtherLoadMeter().start()


def release_memory() -> None:
    gc.collect()


# ----------------------------------------------------------------------------------------------------------
# 1. pagedserve
# ----------------------------------------------------------------------------------------------------------


def make_llm(s: Settings, dtype: str, max_model_len: int | None = None, model: str | None = None) -> LLM:
    return LLM(
        model=model, dtype=dtype, max_model_len=max_model_len or s.max_model_len, block_size=s.block_size,
        max_num_seqs=s.max_num_seqs, max_num_batched_tokens=s.max_num_batched_tokens, seed=s.seed,
        dequantize_gguf=model is None or is_gguf_file(model),  # transformers' weights: the GGUF dequantized
    )


def pagedserve_runs(
    s: Settings, dtype: str, prompts: list[list[int]], model: str | None = None,
    batch_sizes: tuple[int, ...] | None = None,
) -> tuple[list[RunResult], EngineStats]:
    llm = make_llm(s, dtype, model=model)
    log(f"pagedserve {dtype}: warm-up")
    llm.generate([{"prompt_token_ids": p} for p in prompts[:4]], SamplingParams(max_tokens=4, ignore_eos=True,
                 temperature=0), use_tqdm=False)
    results = []
    for n in batch_sizes or s.batch_sizes:
        log(f"pagedserve {dtype}: {n} requests x {s.output_len} tokens ...")
        preempted_before = llm.stats().num_preemptions
        meter = quiet_meter(s)
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts[:n]], s.sampling(), use_tqdm=False)
        seconds = time.perf_counter() - start
        token_ids = [list(o.outputs[0].token_ids) for o in outs]
        result = RunResult("pagedserve", dtype, n, n, sum(map(len, token_ids)), seconds,
                           llm.stats().num_preemptions - preempted_before, token_ids, meter.stop().label())
        log(f"  {result.tok_s:,.1f} tok/s ({seconds:.1f} s); {result.machine}")
        results.append(result)
    stats = llm.stats()
    del llm
    release_memory()
    return results, stats


# ----------------------------------------------------------------------------------------------------------
# 2. transformers on the same weights
# ----------------------------------------------------------------------------------------------------------


def hf_checkpoint(gguf_path: str) -> str:
    """An HF checkpoint directory of the GGUF's weights (dequantized to fp32), built once and cached."""
    name = os.path.splitext(os.path.basename(gguf_path))[0] + "-hf"
    target = os.path.join(HF_CACHE_DIR, name)
    if os.path.exists(os.path.join(target, "config.json")):
        return target
    from transformers import LlamaForCausalLM

    log(f"building the transformers checkpoint {target} (once)")
    model = LlamaForCausalLM(load_gguf_config(gguf_path))
    weights = dict(iter_gguf_tensors(gguf_path, torch.float32))
    missing, unexpected = model.load_state_dict(weights, strict=False)  # a tied lm_head is absent
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"GGUF -> transformers: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    tmp = f"{target}.tmp{os.getpid()}"
    model.save_pretrained(tmp)
    load_gguf_tokenizer(gguf_path).save_pretrained(tmp)
    os.makedirs(HF_CACHE_DIR, exist_ok=True)
    os.replace(tmp, target)
    return target


def hf_generate(model, prompts: list[list[int]], output_len: int, pad_id: int) -> tuple[list, float]:
    """One static batch: left-padded, with an attention mask, exactly `output_len` new tokens, greedy."""
    width = max(map(len, prompts))
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=output_len,
            min_new_tokens=output_len, do_sample=False, pad_token_id=pad_id,
        )
    seconds = time.perf_counter() - start
    return out[:, width:].tolist(), seconds


def transformers_runs(
    s: Settings, dtype: str, prompts: list[list[int]], checkpoint: str, batch_sizes: tuple[int, ...] | None = None,
) -> tuple[list[RunResult], str]:
    """Timed transformers runs, and which model class (and experts implementation, for MoE) ran them."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=DTYPES[dtype]).eval()
    description = f"`{type(model).__name__}.generate`"
    experts = getattr(model.config, "_experts_implementation", None)
    if experts:
        description += f" (experts implementation `{experts}`)"
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else model.config.eos_token_id
    log(f"transformers {dtype}: warm-up")
    hf_generate(model, prompts[:2], 4, pad_id)

    log(f"transformers {dtype}: {s.hf_single_requests} requests one at a time ...")
    token_ids, seconds = [], 0.0
    meter = quiet_meter(s)
    for p in prompts[: s.hf_single_requests]:
        ids, t = hf_generate(model, [p], s.output_len, pad_id)
        token_ids += ids
        seconds += t
    results = [RunResult("transformers", dtype, 1, len(token_ids), sum(map(len, token_ids)), seconds,
                         token_ids=token_ids, machine=meter.stop().label())]
    log(f"  {results[-1].tok_s:,.1f} tok/s ({seconds:.1f} s); {results[-1].machine}")

    for n in batch_sizes or s.hf_batch_sizes:
        log(f"transformers {dtype}: static batch of {n} x {s.output_len} tokens ...")
        meter = quiet_meter(s)
        token_ids, seconds = hf_generate(model, prompts[:n], s.output_len, pad_id)
        results.append(RunResult("transformers", dtype, n, n, sum(map(len, token_ids)), seconds,
                                 token_ids=token_ids, machine=meter.stop().label()))
        log(f"  {results[-1].tok_s:,.1f} tok/s ({seconds:.1f} s); {results[-1].machine}")
    del model
    release_memory()
    return results, description


# ----------------------------------------------------------------------------------------------------------
# 3. Roofline
# ----------------------------------------------------------------------------------------------------------


def measure_rooflines(s: Settings, cost: ModelCost) -> dict[str, Roofline]:
    log(f"roofline: memory bandwidth ({s.copy_mib} MiB copy)")
    bandwidth = copy_bandwidth(s.copy_mib << 20)
    context = s.prompt_len + s.output_len / 2  # mean context of a decode step
    rooflines = {}
    for dtype in s.dtypes:
        log(f"roofline: {dtype} matmul {s.matmul_n}^3")
        itemsize = DTYPES[dtype].itemsize
        rooflines[dtype] = Roofline(
            dtype, matmul_flops(DTYPES[dtype], s.matmul_n), bandwidth,
            cost.decode_bytes_per_token(context, itemsize), cost.flops_per_token(context),
        )
    return rooflines


def achieved_flops(run: RunResult, s: Settings, cost: ModelCost) -> float:
    return run.num_requests * cost.request_flops(s.prompt_len, s.output_len) / run.seconds


# ----------------------------------------------------------------------------------------------------------
# 4. KV-cache waste
# ----------------------------------------------------------------------------------------------------------


def kv_waste(s: Settings, vocab_size: int) -> WasteResult:
    """Step the engine over a wide length mix; tally used vs allocated KV slots after every step."""
    rng = random.Random(s.seed + 1)
    lengths = [(rng.randint(s.waste_min_len, s.waste_max_len), rng.randint(s.waste_min_len, s.waste_max_len))
               for _ in range(s.waste_requests)]
    llm = make_llm(s, "bfloat16", max_model_len=s.waste_max_model_len)
    engine, kv = llm.engine, llm.engine.kv_cache_manager
    max_tokens = {}
    for i, (prompt_len, output_len) in enumerate(lengths):
        request_id = f"waste-{i}"
        prompt = random_prompts(1, prompt_len, vocab_size, s.seed + 100 + i)[0]
        engine.add_request(AddRequest(request_id, prompt, SamplingParams(max_tokens=output_len, ignore_eos=True,
                                                              temperature=0)))
        max_tokens[request_id] = output_len

    stats = llm.stats()
    result = WasteResult(s.waste_requests, 0, 0.0, 0, 0, 0, stats.num_kv_blocks_total * kv.block_size,
                         llm.config.max_model_len)
    total_output = sum(o for _, o in lengths)
    log(f"KV waste: {s.waste_requests} requests, {sum(p for p, _ in lengths)} prompt + {total_output} output "
        "tokens ...")
    start = last_report = time.perf_counter()
    while engine.has_unfinished_requests():
        result.output_tokens += sum(len(o.new_token_ids) for o in engine.step())
        result.steps += 1
        running = engine.scheduler.running
        result.peak_running = max(result.peak_running, len(running))
        for r in running:
            result.used += r.num_computed_tokens
            result.paged += len(kv.req_blocks.get(r.request_id, ())) * kv.block_size
            result.reserve_max_len += result.max_model_len
            result.reserve_request += r.num_prompt_tokens + max_tokens[r.client_request_id]
        if time.perf_counter() - last_report > 30:
            last_report = time.perf_counter()
            log(f"  {result.output_tokens}/{total_output} output tokens, {len(running)} running")
    result.seconds = time.perf_counter() - start
    result.preemptions = llm.stats().num_preemptions
    log(f"  {result.output_tokens / result.seconds:,.1f} tok/s ({result.seconds:.1f} s, {result.steps} "
        "steps)")
    del llm, engine, kv
    release_memory()
    return result


# ----------------------------------------------------------------------------------------------------------
# 5. Start-up
# ----------------------------------------------------------------------------------------------------------

_STARTUP_CHILD = """
import json, time
t0 = time.time()
from pagedserve import LLM, SamplingParams
t1 = time.time()
llm = LLM(dtype="bfloat16")
t2 = time.time()
params = SamplingParams(max_tokens=1, temperature=0)
llm.generate([{"prompt_token_ids": [100, 200, 300]}], params, use_tqdm=False)
t3 = time.time()
print(json.dumps([t0, t1, t2, t3]))
"""


def startup_once() -> StartupResult:
    launch = time.time()
    proc = subprocess.run([sys.executable, "-c", _STARTUP_CHILD], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"start-up child failed:\n{proc.stderr}")
    t0, t1, t2, t3 = json.loads(proc.stdout.strip().splitlines()[-1])
    return StartupResult(t0 - launch, t1 - t0, t2 - t1, t3 - t2)


def startup(s: Settings) -> StartupResult:
    """The median run (by total) of `startup_runs` fresh interpreters."""
    runs = []
    for i in range(s.startup_runs):
        log(f"start-up: fresh interpreter {i + 1}/{s.startup_runs}")
        runs.append(startup_once())
        log(f"  {runs[-1].total:.2f} s to the first token")
    return sorted(runs, key=lambda r: r.total)[len(runs) // 2]


# ----------------------------------------------------------------------------------------------------------
# 6. A mixture-of-experts model
# ----------------------------------------------------------------------------------------------------------

# Qwen3-30B-A3B is hidden 2048, 48 layers, 32 query / 4 KV heads of 128, 128 experts (top-8, normalised) of
# width 768, vocab 151,936. Scaled down to run in minutes on a small CPU: a quarter of the width, 8 layers,
# half the experts with the same top-8, the same query:KV head ratio; the vocabulary is the default model's
# tokenizer (so outputs can be detokenized). Random weights (transformers' own init, std 0.02).
MOE_CONFIG = dict(
    hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=1, head_dim=64,
    num_experts=64, num_experts_per_tok=8, moe_intermediate_size=192, norm_topk_prob=True, intermediate_size=1536,
    vocab_size=49152, max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
)


@dataclass
class MoeResult:
    settings: Settings  # with the MoE prompt and output lengths
    paged: list[RunResult]
    hf: list[RunResult]
    kv_blocks: int
    hf_model: str  # what transformers ran


def moe_params() -> tuple[int, int]:
    """(stored, active per token) parameters of MOE_CONFIG; active counts top-k experts and the lm_head."""
    c = MOE_CONFIG
    hidden, heads, kv_heads = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    head_dim = c["head_dim"]
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2 + 2 * head_dim  # + q/k norms
    expert = 3 * hidden * c["moe_intermediate_size"]
    shared = attention + hidden * c["num_experts"] + 2 * hidden  # + router, norms
    vocab = c["vocab_size"] * hidden
    layers = c["num_hidden_layers"]
    stored = layers * (shared + c["num_experts"] * expert) + hidden + 2 * vocab
    active = layers * (shared + c["num_experts_per_tok"] * expert) + hidden + vocab
    return stored, active


def moe_checkpoint() -> str:
    """The random-weight MoE checkpoint (bf16 safetensors + the default model's tokenizer), built once."""
    target = os.path.join(HF_CACHE_DIR, "qwen3-moe-30b-a3b-scaled-random")
    if os.path.exists(os.path.join(target, "config.json")):
        return target
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    log(f"building the random-weight MoE checkpoint {target} (once)")
    tokenizer = load_gguf_tokenizer(default_model_path())
    config = Qwen3MoeConfig(**MOE_CONFIG, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config).to(torch.bfloat16)
    tmp = f"{target}.tmp{os.getpid()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.makedirs(HF_CACHE_DIR, exist_ok=True)
    os.replace(tmp, target)
    return target


def moe_runs(s: Settings) -> MoeResult:
    s = dataclasses.replace(s, prompt_len=s.moe_prompt_len, output_len=s.moe_output_len)
    checkpoint = moe_checkpoint()
    count = max(s.moe_batch_sizes + s.moe_hf_batch_sizes + (s.hf_single_requests,))
    prompts = random_prompts(count, s.prompt_len, MOE_CONFIG["vocab_size"], s.seed)
    log(f"MoE model {checkpoint}")
    paged, stats = pagedserve_runs(s, s.moe_dtype, prompts, model=checkpoint, batch_sizes=s.moe_batch_sizes)
    hf, hf_model = transformers_runs(s, s.moe_dtype, prompts, checkpoint, batch_sizes=s.moe_hf_batch_sizes)
    return MoeResult(s, paged, hf, stats.num_kv_blocks_total, hf_model)


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Report:
    settings: Settings
    command: str
    machine: list[tuple[str, str]]
    cost: ModelCost
    paged: list[RunResult]
    hf: list[RunResult]
    kv_stats: dict[str, EngineStats]
    rooflines: dict[str, Roofline]
    waste: WasteResult
    startup: StartupResult
    moe: MoeResult
    total_seconds: float = 0.0

    @staticmethod
    def find(runs: list[RunResult], dtype: str, batch: int) -> RunResult | None:
        return next((r for r in runs if r.dtype == dtype and r.batch == batch), None)


def settings_section(r: Report) -> str:
    s, cost = r.settings, r.cost
    model_file = os.path.basename(default_model_path())
    touched = (cost.body_params + cost.lm_head_params) / 1e6
    rows = [
        ("Model", f"SmolLM2-135M-Instruct (`{model_file}`), dequantized to the dtype by both engines"),
        ("Parameters", f"{cost.stored_params / 1e6:.1f} M stored (tied head), {touched:.1f} M touched per "
                       "token"),
        ("Throughput workload", f"random prompts of {s.prompt_len} token ids (seed {s.seed}), "
                                f"{s.output_len} output tokens, `ignore_eos=True`, greedy"),
        ("pagedserve requests per `generate`", ", ".join(map(str, s.batch_sizes))),
        ("pagedserve engine", f"max_model_len={s.max_model_len}, block_size={s.block_size}, "
                              f"max_num_seqs={s.max_num_seqs}, "
                              f"max_num_batched_tokens={s.max_num_batched_tokens}, default KV pool size"),
        ("KV pool (blocks)", ", ".join(f"{d}: {st.num_kv_blocks_total}" for d, st in r.kv_stats.items())),
        ("transformers", f"`LlamaForCausalLM.generate`; one at a time: {s.hf_single_requests} request(s); "
                         f"static batches of {', '.join(map(str, s.hf_batch_sizes))}, left-padded with an "
                         f"attention mask, `max_new_tokens=min_new_tokens={s.output_len}`, greedy"),
        ("KV-waste workload", f"{s.waste_requests} requests; prompt and output lengths each uniform in "
                              f"[{s.waste_min_len}, {s.waste_max_len}]; bfloat16; "
                              f"max_model_len={s.waste_max_model_len}"),
        ("Roofline probes", f"`torch.mm` {s.matmul_n}³, best of 5; {s.copy_mib} MiB tensor copy, best of 5"),
        ("Start-up", f"median of {s.startup_runs} fresh `python -c` interpreter(s) running "
                     "`LLM(dtype='bfloat16')` then a 1-token `generate`"),
    ]
    return markdown_table(["Setting", "Value"], rows)


def _ratio(a: RunResult | None, b: RunResult | None) -> str:
    return fmt(a.tok_s / b.tok_s, 2, "×") if a and b else "-"


def throughput_section(r: Report) -> str:
    s = r.settings
    header = ["dtype", "requests", "pagedserve tok/s", "wall s", "preemptions",
              "transformers tok/s (same batch)", "× same batch", "× HF one at a time", "greedy agreement",
              "rest of the machine (pagedserve run)"]
    rows = []
    for dtype in s.dtypes:
        hf_single = r.find(r.hf, dtype, 1)
        for run in (p for p in r.paged if p.dtype == dtype):
            same = r.find(r.hf, dtype, run.batch)
            agreement = common_prefix_fraction(run.token_ids, same.token_ids) if same else None
            rows.append([
                dtype, run.batch, fmt(run.tok_s), fmt(run.seconds), run.preemptions,
                fmt(same.tok_s) if same else "-", _ratio(run, same), _ratio(run, hf_single),
                None if agreement is None else f"{100 * agreement:.0f}%", run.machine,
            ])
    hf_rows = [
        [h.dtype, "one at a time" if h.batch == 1 else f"static batch {h.batch}", h.num_requests,
         fmt(h.tok_s), fmt(h.seconds), h.machine]
        for h in r.hf
    ]
    return "\n\n".join([
        markdown_table(header, rows),
        "*greedy agreement*: mean share of each output on which pagedserve and transformers agree "
        "before their first differing token (random-id prompts leave near-ties that rounding can flip, "
        "more so in bf16). vLLM is measured against pagedserve in the `offline-vs-vllm` and `peers` sections. "
        f"Each run first waits (bounded) until other processes use under {QUIET_OTHER_CORES} cores; *rest of the "
        "machine*: the 1-minute load at its start and the CPU other processes used while it ran.",
        "transformers runs:",
        markdown_table(["dtype", "mode", "requests", "tok/s", "wall s", "rest of the machine"], hf_rows),
    ])


def roofline_row(r: Report, dtype: str, roof: Roofline, largest: int) -> list[str]:
    s, cost = r.settings, r.cost
    p1, h1 = r.find(r.paged, dtype, 1), r.find(r.hf, dtype, 1)
    pb, hb = r.find(r.paged, dtype, largest), r.find(r.hf, dtype, largest)
    p_flops = achieved_flops(pb, s, cost) if pb else None
    h_flops = achieved_flops(hb, s, cost) if hb else None
    limit = roof.decode_limit_tok_s
    return [
        dtype, fmt(roof.matmul_flops / 1e9, 0), fmt(roof.bandwidth / 1e9),
        fmt(cost.weight_bytes(DTYPES[dtype].itemsize) / 1e6, 0), fmt(roof.decode_bytes_per_token / 1e6, 0),
        fmt(limit), fmt(p1 and p1.tok_s), pct(p1 and p1.tok_s, limit), fmt(h1 and h1.tok_s),
        pct(h1 and h1.tok_s, limit), fmt(p_flops and p_flops / 1e9, 0), pct(p_flops, roof.matmul_flops),
        fmt(h_flops and h_flops / 1e9, 0), pct(h_flops, roof.matmul_flops),
    ]


def roofline_section(r: Report) -> str:
    s, cost = r.settings, r.cost
    largest = max(s.batch_sizes)
    header = ["dtype", "matmul GFLOP/s", "copy GB/s", "weights MB", "decode MB/token", "decode limit tok/s",
              "pagedserve 1-stream tok/s", "% of limit", "transformers 1-stream tok/s", "% of limit",
              f"pagedserve GFLOP/s @{largest}", "% of matmul",
              f"transformers GFLOP/s @{largest}", "% of matmul"]
    rows = [roofline_row(r, dtype, roof, largest) for dtype, roof in r.rooflines.items()]
    context = s.prompt_len + s.output_len / 2
    touched = (cost.body_params + cost.lm_head_params) / 1e6
    notes = (
        f"Model cost: {cost.flops_per_token(context) / 1e6:.0f} MFLOP per decoded token at the mean decode "
        f"context of {context:.0f} tokens (2 × {touched:.1f} M parameters incl. the lm_head, + "
        f"{cost.attention_flops(context) / 1e6:.1f} MFLOP of attention). Decode bytes/token: all weights "
        "read once per step (the tied head once) + that context's K/V; the decode limit is bandwidth / that. "
        "Single-stream tok/s includes the prompt's prefill. The batch GFLOP/s count all useful FLOPs of the "
        f"{largest} requests (prefill + decode, logits only where a token is sampled) over the wall time. "
        "Copy bandwidth = bytes read + bytes written per second."
    )
    return markdown_table(header, rows) + "\n\n" + notes


def waste_section(r: Report) -> str:
    w = r.waste
    rows = [
        ("pagedserve: paged blocks (measured)", f"{100 * w.waste(w.used, w.paged):.1f}%"),
        (f"reserve max_model_len ({w.max_model_len}) per request",
         f"{100 * w.waste(w.used, w.reserve_max_len):.1f}%"),
        ("reserve prompt + max_tokens per request", f"{100 * w.waste(w.used, w.reserve_request):.1f}%"),
    ]
    notes = (
        "Waste = 1 - Σ used / Σ allocated KV slots, summed over every running request after each of "
        f"the run's {w.steps} steps; used = the request's computed tokens, pagedserve's allocation = "
        "its blocks × block_size. The reserve rows are what a static allocator would have held for "
        "the same running requests on the same steps.\n\n"
        f"Run: {w.num_requests} requests, {w.output_tokens} output tokens in {w.seconds:.1f} s "
        f"({w.output_tokens / w.seconds:,.1f} tok/s), at most {w.peak_running} running at once, "
        f"{w.preemptions} preemptions. The KV pool holds {w.pool_slots} token slots, room for "
        f"{w.pool_slots // w.max_model_len} requests at once under a reserve-max_model_len allocator."
    )
    return markdown_table(["allocator", "KV slots wasted"], rows) + "\n\n" + notes


def startup_section(r: Report) -> str:
    t = r.startup
    rows = [
        ("interpreter start", fmt(t.interpreter, 2)),
        ("`import pagedserve`", fmt(t.imports, 2)),
        ("`LLM(dtype='bfloat16')`", fmt(t.engine_init, 2)),
        ("first token (`generate`, max_tokens=1)", fmt(t.first_token, 2)),
        ("**launch → first token**", f"**{t.total:.2f}**"),
        ("engine's own part (LLM() + first token)", fmt(t.engine, 2)),
    ]
    return markdown_table(["phase", "seconds"], rows)


def moe_section(m: MoeResult) -> str:
    s = m.settings
    stored, active = moe_params()
    c = MOE_CONFIG
    shape = (
        f"Qwen3-MoE ({s.moe_dtype}), random weights: hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, "
        f"{c['num_attention_heads']} query / {c['num_key_value_heads']} KV heads of {c['head_dim']}, "
        f"{c['num_experts']} experts top-{c['num_experts_per_tok']} (normalised) of width "
        f"{c['moe_intermediate_size']}, vocab {c['vocab_size']:,}: {stored / 1e6:.0f} M parameters stored, "
        f"{active / 1e6:.0f} M active per token (incl. the lm_head). Qwen3-30B-A3B scaled down (hidden 2048, "
        "48 layers, 32/4 heads of 128, 128 experts top-8 of width 768, vocab 151,936)."
    )
    hf_single = Report.find(m.hf, s.moe_dtype, 1)
    rows = []
    for run in m.paged:
        same = Report.find(m.hf, s.moe_dtype, run.batch)
        agreement = common_prefix_fraction(run.token_ids, same.token_ids) if same else None
        rows.append([run.batch, fmt(run.tok_s), fmt(run.seconds), run.preemptions, fmt(same.tok_s) if same else "-",
                     _ratio(run, same), _ratio(run, hf_single),
                     None if agreement is None else f"{100 * agreement:.0f}%", run.machine])
    header = ["requests", "pagedserve tok/s", "wall s", "preemptions", "transformers tok/s (same batch)",
              "× same batch", "× HF one at a time", "greedy agreement", "rest of the machine (pagedserve run)"]
    hf_rows = [["one at a time" if h.batch == 1 else f"static batch {h.batch}", h.num_requests, fmt(h.tok_s),
                fmt(h.seconds), h.machine] for h in m.hf]
    workload = (
        f"Workload: random prompts of {s.prompt_len} token ids, {s.output_len} output tokens, greedy, "
        f"`ignore_eos=True`. pagedserve: block_size={s.block_size}, max_num_seqs={s.max_num_seqs}, "
        f"max_num_batched_tokens={s.max_num_batched_tokens}, default KV pool ({m.kv_blocks} blocks). "
        f"transformers: {m.hf_model}, {s.hf_single_requests} requests one at a time and left-padded static "
        "batches. Random weights leave many near-ties, so greedy agreement says little here; exactness is "
        "tested in float32 by the test suite."
    )
    return "\n\n".join([
        shape, workload, markdown_table(header, rows), "transformers runs:",
        markdown_table(["mode", "requests", "tok/s", "wall s", "rest of the machine"], hf_rows),
    ])


def render(r: Report) -> str:
    intro = (f"Generated by `{r.command}` in {r.total_seconds / 60:.1f} min; rerun the same command to "
             "regenerate this section.")
    if r.settings.quick:
        intro += " **Quick mode: tiny sizes, for checking the script only; do not quote these numbers.**"
    return "\n\n".join([
        "# pagedserve benchmarks", intro,
        "## Machine", markdown_table(["", ""], r.machine),
        "## Settings", settings_section(r),
        "## Offline throughput: pagedserve vs transformers (output tokens/s)", throughput_section(r),
        "## Roofline", roofline_section(r),
        "## KV-cache waste", waste_section(r),
        "## Start-up time", startup_section(r),
        "## Mixture of experts: pagedserve vs transformers (output tokens/s)", moe_section(r.moe),
    ]) + "\n"


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------


def run(s: Settings, command: str) -> Report:
    start = time.perf_counter()
    machine = machine_description()  # before anything runs: it records the load average too
    gguf_path = default_model_path()
    config = load_gguf_config(gguf_path)
    cost = ModelCost.from_config(config)
    prompts = random_prompts(max(s.batch_sizes + s.hf_batch_sizes), s.prompt_len, config.vocab_size, s.seed)
    rooflines = measure_rooflines(s, cost)
    checkpoint = hf_checkpoint(gguf_path)

    paged, hf, kv_stats = [], [], {}
    for dtype in s.dtypes:
        runs, kv_stats[dtype] = pagedserve_runs(s, dtype, prompts)
        paged += runs
        hf += transformers_runs(s, dtype, prompts, checkpoint)[0]
    waste = kv_waste(s, config.vocab_size)
    start_up = startup(s)
    moe = moe_runs(s)
    report = Report(s, command, machine, cost, paged, hf, kv_stats, rooflines, waste, start_up, moe)
    report.total_seconds = time.perf_counter() - start
    return report


def render_moe_only(s: Settings, command: str) -> str:
    start = time.perf_counter()
    machine = machine_description()
    moe = moe_runs(s)
    intro = f"Generated by `{command}` in {(time.perf_counter() - start) / 60:.1f} min: the MoE comparison only."
    if s.quick:
        intro += " **Quick mode: tiny sizes, for checking the script only; do not quote these numbers.**"
    return "\n\n".join([
        "# pagedserve benchmarks: mixture of experts", intro,
        "## Machine", markdown_table(["", ""], machine),
        "## Mixture of experts: pagedserve vs transformers (output tokens/s)", moe_section(moe),
    ]) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", help="write the report as Markdown into its section of this file")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script quickly")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--only", choices=["moe"], help="run only this part (with the machine description)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the start-up child too
    settings = Settings.quick_settings() if args.quick else Settings()
    log("settings: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(settings).items()))
    flags = [("--quick", args.quick), (f"--threads {args.threads}", args.threads),
             (f"--only {args.only}", args.only), (f"--output {args.output}", args.output)]
    command = " ".join(["python benchmarks/throughput.py"] + [flag for flag, on in flags if on])
    text = render_moe_only(settings, command) if args.only == "moe" else render(run(settings, command))
    print(text)
    if args.output:
        replace_section(args.output, args.only or "throughput", text)
        log(f"wrote section {args.only or 'throughput'} of {args.output}")


if __name__ == "__main__":
    main()
