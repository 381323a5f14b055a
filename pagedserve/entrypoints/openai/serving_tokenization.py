"""/tokenize and /detokenize (vLLM's): the server's own tokenizer and chat template, on the text threads."""

from typing import cast

from .chat_prompt import render_chat_prompt
from .protocol import DetokenizeRequest, TokenizeChatRequest, TokenizeCompletionRequest
from .serving import OpenAIServing


class TokenizationServing(OpenAIServing):
    async def tokenize(self, request: TokenizeCompletionRequest | TokenizeChatRequest) -> dict:
        token_ids = await self.run_text(self._token_ids, request)
        strs = self.engine.tokenizer.convert_ids_to_tokens(token_ids) if request.return_token_strs else None
        return {"count": len(token_ids), "max_model_len": self.max_model_len, "tokens": token_ids, "token_strs": strs}

    async def detokenize(self, request: DetokenizeRequest) -> dict:
        vocab_size = len(self.engine.tokenizer)
        bad = [t for t in request.tokens if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
        return {"prompt": await self.run_text(self._decode, request.tokens)}

    def _token_ids(self, request: TokenizeCompletionRequest | TokenizeChatRequest) -> list[int]:
        if isinstance(request, TokenizeCompletionRequest):
            return self.engine.input_processor.encode(request.prompt, request.add_special_tokens)
        tools = [tool.model_dump(exclude_none=True) for tool in request.tools or ()]
        prompt = render_chat_prompt(self.engine, [m.for_template() for m in request.messages], tools,
                                    request.chat_template or self.options.chat_template,
                                    request.add_generation_prompt, request.continue_final_message)
        if not request.add_special_tokens:
            return cast(list[int], prompt["prompt_token_ids"])
        return self.engine.input_processor.encode(prompt["prompt"], add_special_tokens=True)

    def _decode(self, token_ids: list[int]) -> str:
        return cast(str, self.engine.tokenizer.decode(token_ids))
