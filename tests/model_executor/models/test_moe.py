"""MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE): the MoE layer against transformers' own blocks, both checkpoint
layouts, and clear errors for what is not supported.

Greedy tokens and logprobs against transformers for whole models, in every engine mode, are in
`test_models_vs_transformers.py` (the "mixtral", "qwen2-moe" and "qwen3-moe" entries of conftest's ARCHITECTURES).
"""

import json
import os
import random

import pytest
import torch
from conftest import make_checkpoint
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

from pagedserve import LLM, SamplingParams
from pagedserve.model_executor.layers.moe import SparseMoeBlock, select_experts
from pagedserve.model_executor.models.qwen_moe import QwenMoeForCausalLM

HIDDEN = 64


def random_block(hf_block: torch.nn.Module, ours: SparseMoeBlock) -> None:
    """Random weights in the transformers block, copied into ours (gate/up of the shared expert fused)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in hf_block.parameters():
            p.normal_(0.0, 0.2)
        ours.gate.weight.copy_(hf_block.gate.weight)
        ours.experts.gate_up_proj.copy_(hf_block.experts.gate_up_proj)
        ours.experts.down_proj.copy_(hf_block.experts.down_proj)
        if ours.shared_expert is not None:
            shared = hf_block.shared_expert
            ours.shared_expert.gate_up_proj.weight.copy_(torch.cat([shared.gate_proj.weight, shared.up_proj.weight]))
            ours.shared_expert.down_proj.weight.copy_(shared.down_proj.weight)
            ours.shared_expert_gate.weight.copy_(hf_block.shared_expert_gate.weight)


def mixtral_block(num_experts: int, top_k: int) -> tuple[torch.nn.Module, SparseMoeBlock]:
    config = MixtralConfig(hidden_size=HIDDEN, intermediate_size=32, num_local_experts=num_experts,
                           num_experts_per_tok=top_k)
    ours = SparseMoeBlock(HIDDEN, 32, num_experts, top_k, renormalize=True)
    return MixtralSparseMoeBlock(config), ours


def qwen2_moe_block(num_experts: int, top_k: int) -> tuple[torch.nn.Module, SparseMoeBlock]:
    from pagedserve.model_executor.models.llama import LlamaMLP

    config = Qwen2MoeConfig(hidden_size=HIDDEN, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                            num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=False)
    ours = SparseMoeBlock(HIDDEN, 32, num_experts, top_k, renormalize=False, shared_expert=LlamaMLP(config, 48))
    return Qwen2MoeSparseMoeBlock(config), ours


@pytest.mark.parametrize("num_tokens", [1, 3, 200])  # with 1 or 3 tokens most experts get none
@pytest.mark.parametrize("make_block, num_experts, top_k", [
    (mixtral_block, 8, 2), (mixtral_block, 64, 2), (qwen2_moe_block, 8, 4), (qwen2_moe_block, 60, 4),
])
def test_block_matches_transformers(make_block, num_experts, top_k, num_tokens):
    hf_block, ours = make_block(num_experts, top_k)
    random_block(hf_block, ours)
    x = torch.randn(num_tokens, HIDDEN)
    with torch.no_grad():
        expected = hf_block(x.unsqueeze(0))[0]
        got = ours(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make_block", [mixtral_block, qwen2_moe_block])
def test_idle_experts_in_a_large_batch(make_block):
    """200 tokens, and a router that never picks experts 8-15: they are skipped, the others still match."""
    hf_block, ours = make_block(16, 2)
    random_block(hf_block, ours)
    with torch.no_grad():
        for block in (hf_block, ours):  # positive inputs: warm experts' logits >= 0 >= cold experts' logits
            block.gate.weight[:8] = block.gate.weight[:8].abs()
            block.gate.weight[8:] = -block.gate.weight[8:].abs()
        x = torch.randn(200, HIDDEN).abs()
        _, expert_ids = select_experts(ours.gate(x), 2, ours.renormalize)
        counts = torch.bincount(expert_ids.flatten(), minlength=16)
        assert (counts[8:] == 0).all()
        torch.testing.assert_close(ours(x), hf_block(x.unsqueeze(0))[0], rtol=1e-5, atol=1e-5)


def test_select_experts_renormalize():
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0]])
    probs = torch.softmax(logits, -1)
    weights, ids = select_experts(logits, 2, renormalize=False)
    assert ids.tolist() == [[0, 2]]
    torch.testing.assert_close(weights, probs[:, [0, 2]])
    weights, _ = select_experts(logits, 2, renormalize=True)
    torch.testing.assert_close(weights, probs[:, [0, 2]] / probs[:, [0, 2]].sum())


def test_sparse_layer_placement_matches_transformers():
    """`mlp_only_layers` and `decoder_sparse_step` pick the same dense / MoE layers as transformers."""
    config = Qwen3MoeConfig(hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
                            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                            decoder_sparse_step=2, mlp_only_layers=[3])
    with torch.device("meta"):
        hf_model = Qwen3MoeForCausalLM(config)
        ours = QwenMoeForCausalLM(config, max_model_len=128)
    hf_sparse = [hasattr(layer.mlp, "experts") for layer in hf_model.model.layers]
    our_sparse = [isinstance(layer.mlp, SparseMoeBlock) for layer in ours.model.layers]
    assert our_sparse == hf_sparse == [False, True, False, False, False, True]


# ----------------------------------------------------------------------------------------------------------
# Checkpoint layouts
# ----------------------------------------------------------------------------------------------------------

PROMPTS = [[random.Random(n).randrange(5, 512) for _ in range(n)] for n in (1, 7, 40, 130)]


def generate(path: str) -> list[tuple[list[int], list[float]]]:
    llm = LLM(path, dtype="float32", max_model_len=256, num_kv_blocks=64)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    stats = llm.stats()
    assert stats.num_kv_blocks_free == stats.num_kv_blocks_total
    result = []
    for out in outs:
        c = out.outputs[0]
        result.append((list(c.token_ids), [entry[t].logprob for entry, t in zip(c.logprobs, c.token_ids)]))
    return result


def read_tensors(path: str) -> dict[str, torch.Tensor]:
    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def fuse_experts(tensors: dict[str, torch.Tensor], block: str, gate: str, up: str, down: str) -> dict:
    """Per-expert tensors -> transformers 5's fused 3-D layout (`mlp.experts.gate_up_proj` [E, 2I, H],
    `mlp.experts.down_proj` [E, H, I]), the way its weight conversion stores them in memory."""
    fused = {k: v for k, v in tensors.items() if ".experts." not in k}
    layers = sorted({k.split(".experts.")[0] for k in tensors if ".experts." in k})
    for prefix in layers:
        count = len({k for k in tensors if k.startswith(f"{prefix}.experts.") and k.endswith(f".{down}.weight")})
        expert = [{p: tensors[f"{prefix}.experts.{e}.{p}.weight"] for p in (gate, up, down)} for e in range(count)]
        target = prefix.replace(f".{block}", ".mlp")
        fused[f"{target}.experts.gate_up_proj"] = torch.stack([torch.cat([w[gate], w[up]]) for w in expert])
        fused[f"{target}.experts.down_proj"] = torch.stack([w[down] for w in expert])
    return {k.replace(f".{block}.", ".mlp."): v for k, v in fused.items()}


def copy_checkpoint(src: str, dst: str, tensors: dict[str, torch.Tensor]) -> str:
    os.makedirs(dst)
    for name in os.listdir(src):
        if not name.endswith(".safetensors"):
            with open(os.path.join(src, name), "rb") as f_in, open(os.path.join(dst, name), "wb") as f_out:
                f_out.write(f_in.read())
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(dst, "model.safetensors"),
              metadata={"format": "pt"})
    return dst


LAYOUTS = {  # arch -> (name of the MoE block in Hub checkpoints, gate, up, down projection names)
    "mixtral": ("block_sparse_moe", "w1", "w3", "w2"),
    "qwen2-moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
}


@pytest.mark.parametrize("arch", sorted(LAYOUTS))
def test_fused_and_per_expert_layouts_load_the_same(tmp_path, arch):
    """save_pretrained writes the Hub's per-expert layout; a fused 3-D layout gives identical outputs."""
    block, gate, up, down = LAYOUTS[arch]
    hub = make_checkpoint(str(tmp_path / "hub"), arch)
    tensors = read_tensors(hub)
    assert f"model.layers.0.{block}.experts.0.{gate}.weight" in tensors
    fused = copy_checkpoint(hub, str(tmp_path / "fused"), fuse_experts(tensors, block, gate, up, down))
    assert "model.layers.0.mlp.experts.gate_up_proj" in read_tensors(fused)
    assert generate(fused) == generate(hub)


# ----------------------------------------------------------------------------------------------------------
# Bad checkpoints and unsupported features fail at load, naming the problem
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen2_moe_dir(tmp_path_factory) -> str:
    return make_checkpoint(str(tmp_path_factory.mktemp("moe") / "qwen2-moe"), "qwen2-moe")


def test_missing_expert_weight_is_named(tmp_path, qwen2_moe_dir):
    tensors = read_tensors(qwen2_moe_dir)
    del tensors["model.layers.2.mlp.experts.5.up_proj.weight"]
    path = copy_checkpoint(qwen2_moe_dir, str(tmp_path / "bad"), tensors)
    with pytest.raises(ValueError, match=r"missing weights.*model\.layers\.2\.mlp\.experts\.gate_up_proj@5#1"):
        LLM(path, dtype="float32", max_model_len=128, num_kv_blocks=16)


def test_expert_out_of_range_is_a_value_error(tmp_path, qwen2_moe_dir):
    tensors = read_tensors(qwen2_moe_dir)
    expert_0 = tensors["model.layers.0.mlp.experts.0.down_proj.weight"]
    tensors["model.layers.0.mlp.experts.8.down_proj.weight"] = expert_0.clone()
    path = copy_checkpoint(qwen2_moe_dir, str(tmp_path / "bad"), tensors)
    with pytest.raises(ValueError, match="expert 8 is out of range"):
        LLM(path, dtype="float32", max_model_len=128, num_kv_blocks=16)


def edit_config(src: str, dst: str, **changes) -> str:
    copy_checkpoint(src, dst, read_tensors(src))
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    config.update(changes)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return dst


@pytest.mark.parametrize("changes, message", [
    (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    (dict(num_experts_per_tok=9), r"num_experts_per_tok=9 must be between 1 and the number of experts \(8\)"),
])
def test_unsupported_config_fails_at_load(tmp_path, qwen2_moe_dir, changes, message):
    path = edit_config(qwen2_moe_dir, str(tmp_path / "bad"), **changes)
    with pytest.raises(ValueError, match=message):
        LLM(path, dtype="float32", max_model_len=128, num_kv_blocks=16)
