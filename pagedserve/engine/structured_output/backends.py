"""The grammar backends by name, and which of them compiles a constraint.

The backend modules are imported here, not in `backend.py`, which they import for the interface.
"""

import hashlib
import threading
from collections import OrderedDict

from pagedserve.engine.structured_output.backend import GrammarBackend
from pagedserve.sampling_params import StructuredOutputsParams

BACKENDS = ("xgrammar", "guidance")  # the config's choices but "auto"


def choose_backend(params: StructuredOutputsParams, configured: str) -> str:
    """The backend that compiles `params` ("xgrammar" or "guidance"); a ValueError if it cannot.

    `configured` is the engine's `structured_outputs_config` backend. "auto" is xgrammar, and guidance
    (llguidance) for what xgrammar rejects: regex or Lark features its parser lacks, Lark grammars that name
    special tokens (`<|im_end|>`, which xgrammar resolves only with a tokenizer), `whitespace_pattern`, and
    JSON schemas with keywords xgrammar 0.2 accepts but does not enforce as written: minLength/maxLength,
    contains, uniqueItems (see backend_xgrammar.unenforced_json_keyword).
    Only parsing happens here (well under a millisecond for a tool-sized schema), and the answer is cached by the
    constraint's digest (a constraint may be megabytes: the cache holds 32 bytes of it).
    """
    key = (constraint_digest(params), configured)
    with _CHOICES_LOCK:
        if key in _CHOICES:
            _CHOICES.move_to_end(key)
            return _CHOICES[key]
    choice = _choose_backend(params, configured)  # a ValueError is not cached: a bad constraint is rare
    with _CHOICES_LOCK:
        _CHOICES[key] = choice
        if len(_CHOICES) > MAX_CACHED_CHOICES:
            _CHOICES.popitem(last=False)
    return choice


MAX_CACHED_CHOICES = 4096
_CHOICES: OrderedDict[tuple[bytes, str], str] = OrderedDict()  # (digest, configured) -> backend, LRU
_CHOICES_LOCK = threading.Lock()  # the text threads and the engine's loop ask at once


def constraint_digest(params: StructuredOutputsParams) -> bytes:
    """What a constraint is keyed by in the caches: the sha256 of its canonical text."""
    return hashlib.sha256(params.key().encode()).digest()


def _choose_backend(params: StructuredOutputsParams, configured: str) -> str:
    if configured != "auto":
        backend_class(configured).check(params)
        return configured
    try:
        backend_class("xgrammar").check(params)
        return "xgrammar"
    except ValueError as xgrammar_error:
        try:
            backend_class("guidance").check(params)
        except ValueError:
            raise xgrammar_error from None
        return "guidance"


def backend_class(name: str) -> type[GrammarBackend]:
    """The backend called `name` (one of BACKENDS), imported on first use: a server that never sees a constrained
    request never loads either library."""
    if name == "xgrammar":
        from pagedserve.engine.structured_output.backend_xgrammar import XgrammarBackend

        return XgrammarBackend
    if name == "guidance":
        from pagedserve.engine.structured_output.backend_guidance import GuidanceBackend

        return GuidanceBackend
    raise ValueError(f"unknown structured outputs backend {name!r}; the backends are {BACKENDS}")
