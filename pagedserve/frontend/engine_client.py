"""What the OpenAI layer may use of an engine: `AsyncLLM` (one engine, in a thread or a process of its own) and
the Ray Serve ingress's `RemoteEngine` (replicas behind a router) both offer it, and `build_app` is typed on it."""

from collections.abc import AsyncIterator
from typing import Protocol

from prometheus_client.registry import Collector
from transformers import PreTrainedTokenizerBase

from pagedserve.config import EngineConfig
from pagedserve.engine.protocol import AddRequest
from pagedserve.frontend.input_processor import InputProcessor
from pagedserve.outputs import RequestOutput


class MetricsSource(Protocol):
    @property
    def registry(self) -> Collector:
        """What prometheus_client's generate_latest reads."""
        ...


class EngineClient(Protocol):
    config: EngineConfig
    tokenizer: PreTrainedTokenizerBase
    input_processor: InputProcessor  # makes the AddRequest records, checked against the engine's limits
    errored: str | None  # why the engine is not running now, or None

    @property
    def metrics(self) -> MetricsSource: ...

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    def check_admission(self) -> None:
        """Raise what admitting a request now would (QueueFullError, EngineDeadError), before its text is worked on."""
        ...

    def add_request(self, request: AddRequest) -> AsyncIterator[RequestOutput]:
        """Admit now (raising at once if refused: ValueError, QueueFullError, EngineDeadError); the outputs."""
        ...

    def abort(self, request_id: str) -> None: ...

    def end_requests(self, message: str) -> None:
        """End every open request with this error (shutdown)."""
        ...

    async def reset_prefix_cache(self) -> bool: ...

    async def close_session(self, session_id: str, cache_salt: str | None = None) -> bool:
        """False if there is no such session under this cache_salt (a session is its tenant's)."""
        ...
