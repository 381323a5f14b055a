"""pagedserve: a high-throughput LLM inference engine with a paged KV cache and continuous batching."""

import logging

from pagedserve.config import EngineArgs
from pagedserve.frontend.llm import LLM
from pagedserve.outputs import CompletionOutput, Logprob, RequestOutput
from pagedserve.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "EngineArgs"]
__version__ = "0.1.0"

_logger = logging.getLogger("pagedserve")
if not _logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s", "%m-%d %H:%M:%S"))
    _logger.addHandler(_handler)
    _logger.setLevel(logging.INFO)
    _logger.propagate = False
