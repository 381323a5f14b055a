"""`pagedserve generate [MODEL] --prompt ...` (and, later, `serve` and `bench`)."""

import argparse
import dataclasses
import sys
import types
import typing

from pagedserve.config import EngineArgs

_HELP = {
    "model": "HF checkpoint directory or .gguf file (default: the bundled SmolLM2-135M-Instruct GGUF)",
    "dtype": "float32, bfloat16, float16 or auto",
    "kv_cache_memory_bytes": "KV cache size in bytes (default: a share of free memory)",
    "num_kv_blocks": "number of KV blocks (overrides --kv-cache-memory-bytes)",
    "enable_prefix_caching": "reuse the KV of cached prompt prefixes",
}


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineArgs field, with vllm's spelling (--max-model-len, ...)."""
    for f in dataclasses.fields(EngineArgs):
        if f.name == "model":
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = f.type
        if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=_HELP.get(f.name))
        else:
            parser.add_argument(flag, type=kind, default=f.default, help=_HELP.get(f.name))


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    return EngineArgs(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(EngineArgs)})


def _generate(ns: argparse.Namespace) -> None:
    from pagedserve import LLM, SamplingParams

    llm = LLM(**dataclasses.asdict(engine_args_from(ns)))
    params = SamplingParams(max_tokens=ns.max_tokens, temperature=ns.temperature, top_p=ns.top_p, seed=ns.sampling_seed)
    if ns.chat:
        out = llm.chat([{"role": "user", "content": ns.prompt}], params, use_tqdm=False)[0]
    else:
        out = llm.generate(ns.prompt, params, use_tqdm=False)[0]
        print(ns.prompt, end="")
    print(out.outputs[0].text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pagedserve")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="complete one prompt and print it")
    gen.add_argument("model", nargs="?", default=None, help=_HELP["model"])
    gen.add_argument("--prompt", default="The capital of France is")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--sampling-seed", type=int, default=None)
    add_engine_args(gen)
    ns = parser.parse_args(argv)
    try:
        if ns.command == "generate":
            _generate(ns)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
