"""SpeculativeConfig: vLLM's `speculative_config` dict, checked, with vLLM's defaults. Imports nothing heavy."""

from dataclasses import dataclass, fields

METHODS = ("ngram", "suffix")


@dataclass
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int  # drafted tokens per request and step, at most
    # ngram (prompt lookup): the longest n-gram, n in [min, max], that ends the text and occurred before
    prompt_lookup_max: int | None = None
    prompt_lookup_min: int | None = None
    # suffix (SuffixDecoding): suffix trees over each request's tokens and over past requests' outputs
    suffix_decoding_max_tree_depth: int = 24  # longest match and draft, in tokens
    suffix_decoding_max_cached_requests: int = 10000  # past outputs kept in the global tree (0: none)
    suffix_decoding_max_spec_factor: float = 1.0  # a draft is at most this many times the matched length
    suffix_decoding_min_token_prob: float = 0.1  # a drafted token's estimated probability, at least
    # vLLM's name: no drafts in a step of more requests than this (None: always draft). Our default is not vLLM's
    # (None): on a CPU a large batch is bound by compute, where drafted rows cost as much as real ones.
    disable_by_batch_size: int | None = 64
    # Ours: a step's decode tokens and drafted tokens together, at most; the drafts are shared out evenly among the
    # requests that draft. Verifying rides on one read of the weights only while a step's rows stay few: past ~32
    # rows the quantized CPU matmuls are bound by compute (measured on an AVX2 EPYC: 16 requests with 5-token drafts,
    # 96 rows, ran 0.87x of no drafts, while 4 requests, 24 rows, ran 1.2-1.5x).
    max_tokens_per_step: int = 32

    @classmethod
    def from_dict(cls, config: dict | None) -> "SpeculativeConfig | None":
        """vLLM's checks and defaults; None for no config. A ValueError names what is wrong."""
        if config is None:
            return None
        if not isinstance(config, dict):
            raise ValueError(f"speculative_config must be a dict (JSON object), got {type(config).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"speculative_config has unknown keys {unknown}; known: {sorted(known)}")
        values = dict(config)
        method = values.get("method")
        if method == "[ngram]":
            method = values["method"] = "ngram"
        if method not in METHODS:
            raise ValueError(f"speculative_config method must be one of {METHODS} (model-free drafts), got "
                             f"{method!r}")
        if method == "suffix" and values.get("num_speculative_tokens") is None:
            # as vLLM: suffix decoding sizes each draft itself, up to the tree depth
            values["num_speculative_tokens"] = values.get("suffix_decoding_max_tree_depth", 24)
        if values.get("num_speculative_tokens") is None:
            raise ValueError("speculative_config needs num_speculative_tokens for method 'ngram'")
        spec = cls(**values)
        spec._check()
        return spec

    def _check(self) -> None:
        def positive_int(name: str, value: object) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"speculative_config {name} must be a positive integer, got {value!r}")

        positive_int("num_speculative_tokens", self.num_speculative_tokens)
        if self.method == "ngram":
            if self.prompt_lookup_min is None and self.prompt_lookup_max is None:
                self.prompt_lookup_min = self.prompt_lookup_max = 5  # vLLM's defaults
            elif self.prompt_lookup_min is None:
                self.prompt_lookup_min = self.prompt_lookup_max
            elif self.prompt_lookup_max is None:
                self.prompt_lookup_max = self.prompt_lookup_min
            positive_int("prompt_lookup_min", self.prompt_lookup_min)
            positive_int("prompt_lookup_max", self.prompt_lookup_max)
            assert self.prompt_lookup_min is not None and self.prompt_lookup_max is not None
            if self.prompt_lookup_min > self.prompt_lookup_max:
                raise ValueError(f"speculative_config prompt_lookup_min ({self.prompt_lookup_min}) must be at most "
                                 f"prompt_lookup_max ({self.prompt_lookup_max})")
        positive_int("suffix_decoding_max_tree_depth", self.suffix_decoding_max_tree_depth)
        count = self.suffix_decoding_max_cached_requests
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"speculative_config suffix_decoding_max_cached_requests must be an integer >= 0, "
                             f"got {count!r}")
        for name, low, high in (("suffix_decoding_max_spec_factor", 0.0, float("inf")),
                                ("suffix_decoding_min_token_prob", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ValueError(f"speculative_config {name} must be a number in [{low}, {high}], got {value!r}")
        if self.disable_by_batch_size is not None:
            positive_int("disable_by_batch_size", self.disable_by_batch_size)
        positive_int("max_tokens_per_step", self.max_tokens_per_step)
