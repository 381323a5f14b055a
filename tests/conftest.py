"""Tiny random-weight checkpoints of each architecture, built with transformers' own config classes.

Weights are drawn with std 0.2 so greedy choices are decisive (no near-ties that float noise could flip).
A small BPE tokenizer with a ChatML template is trained on the spot. Nothing is downloaded. The GGUF tests also
get the default model as transformers loads it.
"""

import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "entrypoints", "openai"))  # server_utils

VOCAB_SIZE = 512
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Paged attention keeps the KV cache in fixed-size blocks with block tables.",
    "Continuous batching lets throughput grow with the number of concurrent users.",
    "Héllo wörld, ça va? 日本語のテキスト、絵文字 🚀 too.",
    "def add(a, b):\n    return a + b\n",
] * 20

_COMMON = dict(
    vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)

ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM, dict(rope_theta=10000.0)),
    "llama3-rope": (LlamaConfig, LlamaForCausalLM, dict(
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}, rope_theta=50000.0, tie_word_embeddings=True)),
    "llama-linear-rope": (LlamaConfig, LlamaForCausalLM, dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=None)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=32)),
    # MoE: 8 experts top-2 (renormalised); 8 experts top-4 + shared expert, layer 1 dense; 64 experts top-8, so
    # most experts get no token in a decode step
    "mixtral": (MixtralConfig, MixtralForCausalLM, dict(num_local_experts=8, num_experts_per_tok=2,
                                                        intermediate_size=64)),
    "qwen2-moe": (Qwen2MoeConfig, Qwen2MoeForCausalLM, dict(
        num_experts=8, num_experts_per_tok=4, moe_intermediate_size=32, shared_expert_intermediate_size=64,
        num_hidden_layers=3, mlp_only_layers=[1])),
    "qwen3-moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM, dict(
        num_experts=64, num_experts_per_tok=8, moe_intermediate_size=32, norm_topk_prob=True, head_dim=32)),
    # GPT2Config maps hidden_size, num_hidden_layers, ... onto n_embd, n_layer, ...; n_inner is its MLP width.
    "gpt2": (GPT2Config, GPT2LMHeadModel, dict(n_inner=128)),
    # LongRoPE with original context 80: prompts on both sides of it (short factors up to 64 + 8 tokens, long
    # from 100); 3/4 of each head rotates; a window of 48
    "phi3": (Phi3Config, Phi3ForCausalLM, dict(
        rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                      "long_factor": [1.0, 1.5, 3.0, 6.0, 12.0, 24.0]},
        original_max_position_embeddings=80, partial_rotary_factor=0.75, sliding_window=48)),
    # windows of 32 so that most prompts (up to 300 tokens) outgrow them
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, dict(head_dim=32, query_pre_attn_scalar=24, sliding_window=32)),
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, dict(
        head_dim=32, sliding_window=32, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}})),
    "mistral-sliding": (MistralConfig, MistralForCausalLM, dict(sliding_window=32)),
}


def make_tokenizer(path: str) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def make_checkpoint(path: str, arch: str, seed: int = 0, max_shard_size: str | None = None, **overrides) -> str:
    """`overrides`: config fields to change from the architecture's tiny defaults."""
    config_cls, model_cls, extra = ARCHITECTURES[arch]
    config = config_cls(**{**_COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2)
    if max_shard_size:
        model.save_pretrained(path, max_shard_size=max_shard_size)
    else:
        model.save_pretrained(path)
    make_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {arch: make_checkpoint(os.path.join(root, arch), arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def llama_dir(checkpoints) -> str:
    return checkpoints["llama"]


# ---- the default model (SmolLM2, a GGUF file) as transformers itself loads it, for the GGUF tests -------------


@pytest.fixture(scope="session")
def hf_model() -> torch.nn.Module:
    """SmolLM2 as loaded by transformers itself (slow: ~20 s, so once per session)."""
    from transformers import AutoModelForCausalLM

    from pagedserve.model_files import default_model_path

    directory, name = os.path.split(default_model_path())
    return AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)


@pytest.fixture(scope="session")
def hf_tokenizer():
    from transformers import AutoTokenizer

    from pagedserve.model_files import default_model_path

    directory, name = os.path.split(default_model_path())
    return AutoTokenizer.from_pretrained(directory, gguf_file=name)


@pytest.fixture
def isolated_gguf_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """GGUF tokenizers cached under the session's temporary folder, not the user's cache."""
    monkeypatch.setenv("PAGEDSERVE_CACHE", str(tmp_path_factory.getbasetemp() / "pagedserve-cache"))


# ---- the /v1/responses tests (tests/entrypoints/openai/responses/) ----


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL cluster (initdb in a temporary directory, on a free port), as a store URL."""
    if shutil.which("initdb") is None or shutil.which("pg_ctl") is None:
        pytest.skip("PostgreSQL's initdb/pg_ctl are not installed")
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # initdb refuses to run as root
    from server_utils import free_port

    root = tempfile.mkdtemp(prefix="pagedserve-pg-")
    os.chmod(root, 0o777)
    data, port = os.path.join(root, "data"), free_port()
    subprocess.run([*as_user, "initdb", "-D", data, "-U", "pagedserve", "--auth=trust"], check=True,
                   capture_output=True)
    subprocess.run([*as_user, "pg_ctl", "-D", data, "-w", "-l", os.path.join(root, "log"), "-o",
                    f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql://pagedserve@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, "pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def responses_server(llama_dir):
    """One server for the /v1/responses tests (tiny random checkpoint, hermes tool parser, a store of its own)."""
    from server_utils import ServerProcess

    proc = ServerProcess(llama_dir, "--engine-placement", "thread", "--enable-auto-tool-choice", "--tool-call-parser",
                         "hermes", "--enable-prompt-tokens-details",
                         sizes=("--dtype", "float32", "--max-model-len", "1024", "--num-kv-blocks", "512"))
    yield proc
    assert proc.stop() == 0
