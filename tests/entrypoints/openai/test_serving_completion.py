"""/v1/completions with echo and logprobs (OpenAI's legacy format, lm-evaluation-harness's loglikelihood requests:
`echo`, `logprobs`, `max_tokens: 0`) and vLLM's `prompt_logprobs`, driven in process at the ASGI level, checked
against transformers on the same weights (float32)."""

import asyncio
import json

import httpx
import pytest
import torch
from server_utils import in_process_app
from transformers import AutoModelForCausalLM

PROMPT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def hf_logprobs(llama_dir):
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()

    def prompt_logprobs(ids: list[int]) -> list[float]:
        """transformers' logprob of each prompt token after the first."""
        with torch.no_grad():
            rows = model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
        return [rows[i, token].item() for i, token in enumerate(ids[1:])]

    return prompt_logprobs


def post_all(llama_dir, bodies: list[dict]) -> list[httpx.Response | list[dict]]:
    """Each body to /v1/completions in turn; a streamed one comes back as its list of SSE events."""

    async def main():
        async with in_process_app(llama_dir) as (client, _):
            results: list = []
            for body in bodies:
                resp = await client.post("/v1/completions", json={"model": "m", "temperature": 0, **body})
                if body.get("stream") and resp.status_code == 200:
                    lines = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
                    assert lines[-1] == "[DONE]"
                    results.append([json.loads(line) for line in lines[:-1]])
                else:
                    results.append(resp)
            return results

    return asyncio.run(main())


def test_loglikelihood_as_lm_eval_asks_equals_transformers(llama_dir, hf_logprobs):
    scored, = post_all(llama_dir, [{"prompt": PROMPT, "echo": True, "logprobs": 1, "max_tokens": 0,
                                    "return_token_ids": True}])
    assert scored.status_code == 200, scored.text
    choice = scored.json()["choices"][0]
    ids = choice["prompt_token_ids"]
    assert choice["text"] == PROMPT and choice["token_ids"] == []
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(ids) and "".join(logprobs["tokens"]) == PROMPT
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["token_logprobs"][1:] == pytest.approx(hf_logprobs(ids), abs=1e-4)
    assert sum(logprobs["token_logprobs"][1:]) == pytest.approx(sum(hf_logprobs(ids)), abs=1e-4)
    offsets = logprobs["text_offset"]
    assert offsets[0] == 0 and all(PROMPT[o:].startswith(t) for o, t in zip(offsets, logprobs["tokens"]))
    for token, top, lp in zip(logprobs["tokens"][1:], logprobs["top_logprobs"][1:], logprobs["token_logprobs"][1:]):
        assert 1 <= len(top) <= 2 and top.get(token, lp) == pytest.approx(lp)  # the token, and the top 1
        assert max(top.values()) >= lp


def test_echo_with_generation_and_prompt_logprobs(llama_dir, hf_logprobs):
    plain, echoed, with_prompt_logprobs = post_all(llama_dir, [
        {"prompt": PROMPT, "logprobs": 2, "max_tokens": 5, "ignore_eos": True},
        {"prompt": PROMPT, "echo": True, "logprobs": 2, "max_tokens": 5, "ignore_eos": True,
         "return_token_ids": True},
        {"prompt": PROMPT, "prompt_logprobs": 2, "max_tokens": 1, "return_token_ids": True},
    ])
    plain_choice, echo_choice = plain.json()["choices"][0], echoed.json()["choices"][0]
    ids = echo_choice["prompt_token_ids"]
    assert echo_choice["text"] == PROMPT + plain_choice["text"]
    generated = plain_choice["logprobs"]
    echo_logprobs = echo_choice["logprobs"]
    assert echo_logprobs["tokens"][len(ids):] == generated["tokens"]
    assert echo_logprobs["token_logprobs"][len(ids):] == pytest.approx(generated["token_logprobs"])
    assert echo_logprobs["token_logprobs"][1:len(ids)] == pytest.approx(hf_logprobs(ids), abs=1e-4)
    assert echo_logprobs["text_offset"][len(ids)] == len(PROMPT)

    prompt_logprobs = with_prompt_logprobs.json()["choices"][0]["prompt_logprobs"]
    assert len(prompt_logprobs) == len(ids) and prompt_logprobs[0] is None
    for entry, token, expected in zip(prompt_logprobs[1:], ids[1:], hf_logprobs(ids)):
        assert entry[str(token)]["logprob"] == pytest.approx(expected, abs=1e-4)
        assert sorted(e["rank"] for t, e in entry.items() if t != str(token) or e["rank"] <= 2)[:2] == [1, 2]


def test_streamed_echo_sends_the_scored_prompt_first(llama_dir, hf_logprobs):
    events, whole = post_all(llama_dir, [
        {"prompt": PROMPT, "echo": True, "logprobs": 1, "max_tokens": 0, "stream": True},
        {"prompt": PROMPT, "echo": True, "logprobs": 1, "max_tokens": 0, "return_token_ids": True},
    ])
    choices = [c for event in events for c in event["choices"]]
    assert "".join(c["text"] for c in choices) == PROMPT
    first = choices[0]["logprobs"]
    assert first["token_logprobs"] == pytest.approx(whole.json()["choices"][0]["logprobs"]["token_logprobs"])
    assert all(c["logprobs"] is None for c in choices[1:])
    assert choices[-1]["finish_reason"] == "length"


def test_max_tokens_zero_without_echo_is_a_400(llama_dir):
    resp, = post_all(llama_dir, [{"prompt": PROMPT, "max_tokens": 0}])
    assert resp.status_code == 400 and "max_tokens" in resp.json()["error"]["message"]
