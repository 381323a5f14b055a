"""Grammar-constrained decoding (vLLM's structured outputs): JSON schema, regex, choice, EBNF/Lark grammar,
any JSON object, structural tags.

`backend.py` is the interface (and what the backends share), `backend_xgrammar.py` and `backend_guidance.py` the two
implementations, `backends.py` the backends by name and the choice of backend (with the request check the front
end and the engine core share), `manager.py` the `StructuredOutputManager` the engine core keeps beside its
scheduler.
"""
