"""The grammar backends by name, and which of them compiles a constraint.

The backend modules are imported here, not in `backend.py`, which they import for the interface.
"""

import functools
import json

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
    Only parsing happens here (well under a millisecond for a tool-sized schema), and the answer is cached.
    """
    return _choose_backend(params.key(), configured)


@functools.lru_cache(maxsize=1024)
def _choose_backend(key: str, configured: str) -> str:
    params = StructuredOutputsParams(**json.loads(key))
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
