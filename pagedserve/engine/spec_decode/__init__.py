"""Speculative decoding with model-free drafts (vLLM's `ngram` and `suffix` methods): a proposer guesses the next
tokens of a request from text it has seen, and one step of the target model verifies them (see engine_core.py)."""
