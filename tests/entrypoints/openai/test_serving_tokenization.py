"""POST /tokenize and /detokenize (vLLM's shapes), driven in process at the ASGI level."""

import asyncio

import httpx
from server_utils import in_process_app


def post_all(llama_dir, calls: list[tuple[str, dict]]) -> tuple[list[httpx.Response], object]:
    async def main():
        async with in_process_app(llama_dir) as (client, engine):
            return [await client.post(path, json=body) for path, body in calls], engine.tokenizer

    return asyncio.run(main())


def test_tokenize_a_prompt_and_chat_messages_and_back(llama_dir):
    messages = [{"role": "user", "content": "hello there"}]
    (plain, strs, chat, chat_open, detok), tokenizer = post_all(llama_dir, [
        ("/tokenize", {"model": "m", "prompt": "The quick brown fox"}),
        ("/tokenize", {"prompt": "The quick brown fox", "add_special_tokens": False, "return_token_strs": True}),
        ("/tokenize", {"messages": messages}),
        ("/tokenize", {"messages": messages, "add_generation_prompt": False}),
        ("/detokenize", {"model": "m", "tokens": tokenizer_ids(llama_dir, "The quick brown fox")}),
    ])
    body = plain.json()
    assert body["tokens"] == tokenizer.encode("The quick brown fox") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 256 and body["token_strs"] is None
    unspecial = strs.json()
    assert unspecial["tokens"] == tokenizer.encode("The quick brown fox", add_special_tokens=False)
    assert unspecial["token_strs"] == tokenizer.convert_ids_to_tokens(unspecial["tokens"])
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert chat.json()["tokens"] == tokenizer.encode(rendered, add_special_tokens=False)
    assert len(chat_open.json()["tokens"]) < len(chat.json()["tokens"])  # no assistant header
    assert detok.json() == {"prompt": "The quick brown fox"}


def tokenizer_ids(llama_dir: str, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama_dir).encode(text, add_special_tokens=False)


def test_bad_input_is_a_400_in_openais_shape(llama_dir):
    (out_of_vocab, negative, neither, unknown_model), _ = post_all(llama_dir, [
        ("/detokenize", {"tokens": [10**9]}),
        ("/detokenize", {"tokens": [-1]}),
        ("/tokenize", {"text": "no prompt, no messages"}),
        ("/tokenize", {"model": "other", "prompt": "x"}),
    ])
    assert out_of_vocab.status_code == 400 and "vocabulary" in out_of_vocab.json()["error"]["message"]
    assert negative.status_code == 400
    assert neither.status_code == 400 and neither.json()["error"]["type"] == "invalid_request_error"
    assert unknown_model.status_code == 404
