"""pagedserve: a high-throughput LLM inference engine with a paged KV cache and continuous batching.

The public names load on first use (PEP 562), so `import pagedserve.<light module>` does not pull in torch:
the server starts its engine process before the front end's own heavy imports.
"""

import importlib
import logging

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput", "Logprob",
           "EngineArgs", "AsyncLLM"]
__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "pagedserve.frontend.llm",
    "SamplingParams": "pagedserve.sampling_params",
    "StructuredOutputsParams": "pagedserve.sampling_params",
    "AsyncLLM": "pagedserve.frontend.async_llm",
    "RequestOutput": "pagedserve.outputs",
    "CompletionOutput": "pagedserve.outputs",
    "Logprob": "pagedserve.outputs",
    "EngineArgs": "pagedserve.engine_args",
}


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pagedserve' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


_logger = logging.getLogger("pagedserve")
if not _logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s", "%m-%d %H:%M:%S"))
    _logger.addHandler(_handler)
    _logger.setLevel(logging.INFO)
    _logger.propagate = False
