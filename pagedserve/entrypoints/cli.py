"""`pagedserve generate [MODEL]`, `pagedserve serve [MODEL]`, `pagedserve bench serve`."""

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import types
import typing

from pagedserve.engine_args import EngineArgs

if typing.TYPE_CHECKING:
    from pagedserve.entrypoints.openai.serving import ServingOptions

TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral", "pythonic")  # tool_parsers.TOOL_PARSERS, light to import
ROUTERS = ("session", "prefix", "round-robin", "ray-prefix")  # ray_serve.router.POLICIES + Ray's, without Ray

_HELP = {
    "model": "HF checkpoint directory or .gguf file (default: the bundled SmolLM2-135M-Instruct GGUF)",
    "tokenizer": "tokenizer directory (default: the model's)",
    "gguf_file": "a .gguf file inside the MODEL directory",
    "dtype": "float32, bfloat16, float16 or auto (the checkpoint's; bf16 only on CPUs with AVX512-BF16/AMX)",
    "quantization": "gguf: compute on a GGUF file's blocks (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K; the default for a "
                    ".gguf file on a CPU); int8 / int4: quantize a Hugging Face checkpoint's linear weights at load "
                    "(int8 per channel, int4 in groups of 128); gptq / awq: a 4-bit GPTQ / AWQ checkpoint (found "
                    "from its config.json when not given)",
    "dequantize_gguf": "load a .gguf file's weights dequantized to --dtype instead of computing on its blocks",
    "max_model_len": "longest prompt + output, in tokens (default: the config's max_position_embeddings)",
    "block_size": "tokens per KV-cache block",
    "max_num_seqs": "most sequences in one step",
    "max_num_batched_tokens": "most tokens in one step; longer prompts are prefilled in chunks (default 2048)",
    "kv_cache_memory_bytes": "KV cache size in bytes (default: a share of free memory)",
    "num_kv_blocks": "number of KV blocks (overrides --kv-cache-memory-bytes)",
    "num_gpu_blocks_override": "vLLM's name for --num-kv-blocks",
    "enable_prefix_caching": "reuse the KV of cached prompt prefixes",
    "seed": "global random seed (per-request seeds come with each request)",
    "device": "cpu, cuda or auto",
    "structured_outputs_config": 'JSON, e.g. \'{"backend": "xgrammar"}\' (xgrammar, guidance or auto)',
    "scheduling_policy": "fcfs, priority (lower `priority` first, as vLLM) or session (agent sessions: the one with "
                         "the least service so far first)",
    "async_scheduling": "schedule the next step while the model runs this one (off by default: on a CPU the "
                        "scheduler's Python competes with the forward for the cores)",
    "tensor_parallel_size": "split the model across this many ranks (heads, MLP slices, experts, vocabulary); "
                            "gloo on CPU, NCCL on GPUs (one per rank)",
    "distributed_executor_backend": "how the ranks > 0 run: mp (processes, the default) or ray (Ray actors on "
                                    "this node)",
    "speculative_config": 'JSON, vLLM\'s: \'{"method": "ngram", "num_speculative_tokens": 4}\' (prompt lookup: '
                          'prompt_lookup_min / _max, default 5) or \'{"method": "suffix"}\' (suffix trees over the '
                          'request and past outputs: suffix_decoding_max_tree_depth, ..._max_cached_requests, '
                          '..._max_spec_factor, ..._min_token_prob)',
    "generation_config": "default sampling settings of requests: 'auto' (the model's generation_config.json), "
                         "'vllm' (none), or a directory holding a generation_config.json",
}

_SHORT_FLAGS = {"tensor_parallel_size": ["-tp"]}  # vLLM's


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineArgs field, with vllm's spelling (--max-model-len, ...)."""
    for f in dataclasses.fields(EngineArgs):
        if f.name == "model":
            continue
        flags = ["--" + f.name.replace("_", "-"), *_SHORT_FLAGS.get(f.name, [])]
        kind = f.type
        if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if kind is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, default=f.default,
                                help=_HELP.get(f.name))
        elif kind is dict:
            parser.add_argument(*flags, type=_json_object, default=f.default, help=_HELP.get(f.name))
        else:
            parser.add_argument(*flags, type=kind, default=f.default, help=_HELP.get(f.name))


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    return EngineArgs(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(EngineArgs)})


def _generate(ns: argparse.Namespace) -> None:
    from pagedserve.frontend.llm import LLM
    from pagedserve.sampling_params import SamplingParams

    llm = LLM(**dataclasses.asdict(engine_args_from(ns)))
    params = SamplingParams(max_tokens=ns.max_tokens, temperature=ns.temperature, top_p=ns.top_p, seed=ns.sampling_seed)
    if ns.chat:
        out = llm.chat([{"role": "user", "content": ns.prompt}], params, use_tqdm=False)[0]
    else:
        out = llm.generate(ns.prompt, params, use_tqdm=False)[0]
        print(ns.prompt, end="")
    print(out.outputs[0].text)


def _read_chat_template(value: str | None) -> str | None:
    """--chat-template is a file path or the Jinja template itself (as vLLM)."""
    if value is None or not os.path.isfile(value):
        return value
    with open(value) as f:
        return f.read()


def _served_model_name(ns: argparse.Namespace) -> str:
    if ns.served_model_name:
        return ns.served_model_name
    if ns.model:
        return ns.model
    from pagedserve.model_files import default_model_path

    return os.path.basename(default_model_path()).split(".")[0]


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a port in use fails at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def _stop_starting(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # a SIGTERM while the model loads: stop cleanly (the engine process too)


def _serving_options(ns: argparse.Namespace) -> "ServingOptions":
    from pagedserve.entrypoints.openai.serving import ServingOptions

    return ServingOptions(
        model_name=_served_model_name(ns), chat_template=_read_chat_template(ns.chat_template),
        trust_request_chat_template=ns.trust_request_chat_template,
        enable_prompt_tokens_details=ns.enable_prompt_tokens_details,
        enable_auto_tool_choice=ns.enable_auto_tool_choice, tool_call_parser=ns.tool_call_parser,
        responses_store=ns.responses_store, responses_ttl_s=ns.responses_ttl,
        responses_max_stored=ns.responses_max_stored, server_address=f"{socket.gethostname()}:{ns.port}",
    )


def _serve_on_ray(ns: argparse.Namespace, engine_args: EngineArgs) -> int:
    """--num-replicas / --autoscaling-config: replicas on Ray Serve behind the same OpenAI app."""
    try:
        from pagedserve.entrypoints.ray_serve.app import ReplicaSettings, build_application, run
    except ImportError as e:
        raise ValueError(f"--num-replicas needs Ray Serve: pip install 'pagedserve[ray]' ({e})") from None
    bind_socket(ns.host, ns.port).close()  # a port in use fails now, not after the replicas load
    settings = ReplicaSettings(
        num_replicas=ns.num_replicas or 1, router=ns.router, autoscaling_config=ns.autoscaling_config,
        engine_placement=ns.engine_placement, max_waiting_requests=ns.max_waiting_requests,
        replica_cpus=ns.replica_cpus, shutdown_timeout=ns.shutdown_timeout, log_interval=ns.log_interval)
    app = build_application(engine_args, _serving_options(ns), settings, ns.api_key, ns.max_request_body_bytes)
    return run(app, ns.host, ns.port, ns.ray_address)


def _serve(ns: argparse.Namespace) -> int:
    from pagedserve.engine.process import start_engine_process
    from pagedserve.model_files import resolve_model

    engine_args = engine_args_from(ns)
    resolve_model(engine_args.model, engine_args.gguf_file)  # a bad path: one line, before anything starts
    if ns.responses_store is not None:
        from pagedserve.entrypoints.openai.responses.store import check_store_url

        check_store_url(ns.responses_store)  # likewise a bad store URL
    if ns.num_replicas is not None or ns.autoscaling_config is not None:
        return _serve_on_ray(ns, engine_args)
    sock = bind_socket(ns.host, ns.port)
    signal.signal(signal.SIGTERM, _stop_starting)
    engine_process = None
    try:
        # the engine process first: its imports and model load overlap the front end's imports below
        if ns.engine_placement == "process":
            engine_process = start_engine_process(engine_args, logging.getLogger("pagedserve").level)
        from pagedserve.entrypoints.openai.api_server import serve
        from pagedserve.frontend.async_llm import AsyncLLM

        options = _serving_options(ns)
        engine = AsyncLLM(engine_args, ns.engine_placement, options.model_name, ns.log_interval,
                          ns.max_waiting_requests, engine_process, ns.max_engine_restarts)
        return asyncio.run(serve(engine, options, sock, ns.api_key, ns.shutdown_timeout, ns.max_request_body_bytes,
                                 ns.log_level))
    except KeyboardInterrupt:
        return 0
    finally:
        if engine_process is not None:
            engine_process.stop()
        sock.close()


def _add_serve_parser(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="start the OpenAI-compatible server",
                           description="Start the OpenAI-compatible HTTP server (flags named as `vllm serve`'s).")
    serve.add_argument("model", nargs="?", default=None, help=_HELP["model"])
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--api-key", default=os.environ.get("PAGEDSERVE_API_KEY"),
                       help="require `Authorization: Bearer KEY` on every /v1 route (or $PAGEDSERVE_API_KEY)")
    serve.add_argument("--served-model-name", default=None,
                       help="the model id clients send and /v1/models lists (default: MODEL as given)")
    serve.add_argument("--chat-template", default=None,
                       help="a Jinja chat template, or a file holding one (default: the tokenizer's)")
    serve.add_argument("--max-waiting-requests", type=int, default=4096,
                       help="requests allowed to wait beyond the running batch; past it new ones get 503")
    serve.add_argument("--engine-placement", choices=["thread", "process"], default="process",
                       help="run the engine loop in a thread of the server or in its own process (ZeroMQ)")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="seconds in-flight requests get to finish after SIGTERM before they are aborted")
    serve.add_argument("--log-interval", type=float, default=5.0, help="seconds between throughput log lines")
    serve.add_argument("--max-request-body-bytes", type=int, default=4 << 20,
                       help="larger request bodies are refused at once with 413 (default 4 MiB)")
    serve.add_argument("--trust-request-chat-template", action="store_true",
                       help="accept a chat_template in requests (Jinja the server runs; refused by default)")
    serve.add_argument("--enable-prompt-tokens-details", action="store_true",
                       help="report usage.prompt_tokens_details.cached_tokens (tells a client whether a prompt "
                            "prefix was cached, by anyone: use cache_salt per tenant)")
    serve.add_argument("--enable-auto-tool-choice", action="store_true",
                       help='serve tool_choice "auto": the model may call tools, parsed by --tool-call-parser')
    serve.add_argument("--tool-call-parser", choices=TOOL_CALL_PARSERS, default=None,
                       help="the model family's tool-call format")
    serve.add_argument("--max-engine-restarts", type=int, default=3,
                       help="restarts of a dead engine allowed within ten minutes before the server exits with 1")
    _add_responses_args(serve)
    _add_ray_args(serve)
    add_engine_args(serve)
    _add_log_level(serve)


def _add_responses_args(serve: argparse.ArgumentParser) -> None:
    responses = serve.add_argument_group("/v1/responses: the response store")
    responses.add_argument("--responses-store", default=None, metavar="URL",
                           help="where stored responses live: sqlite:///PATH or postgresql://USER:PASSWORD@HOST/DB "
                                "(several servers on one database); default: a SQLite file, "
                                "$XDG_CACHE_HOME/pagedserve/responses.db (~/.cache/...)")
    responses.add_argument("--responses-ttl", type=_positive_float, default=30 * 24 * 3600.0, metavar="S",
                           help="seconds a stored response is kept (default 30 days)")
    responses.add_argument("--responses-max-stored", type=_positive_int, default=100_000, metavar="N",
                           help="most stored responses; past it the oldest are dropped (default 100000)")


def _add_ray_args(serve: argparse.ArgumentParser) -> None:
    ray = serve.add_argument_group("data-parallel replicas on Ray Serve (pip install 'pagedserve[ray]')")
    ray.add_argument("--num-replicas", type=_positive_int, default=None,
                     help="serve with this many engine replicas (each its own engine and KV pool) on Ray Serve")
    ray.add_argument("--ray-address", default=None,
                     help="the Ray cluster to join (`ray start --head` prints it); default: a local Ray instance")
    ray.add_argument("--router", choices=ROUTERS, default="session",
                     help="which replica serves a request: session (a session's replica, else the longest cached "
                          "prefix, else the less loaded of two), prefix (the last two), round-robin; ray-prefix: Ray's "
                          "PrefixCacheAffinityRouter, for comparison")
    ray.add_argument("--autoscaling-config", type=_json_object, default=None,
                     help="Ray Serve's autoscaling_config as JSON (replaces --num-replicas), e.g. "
                          '\'{"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 32}\'')
    ray.add_argument("--replica-cpus", type=float, default=1.0,
                     help="CPUs Ray reserves for each replica (Ray also sets its OMP_NUM_THREADS, so torch's threads, "
                          "from it)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def _add_log_level(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info",
                        help="pagedserve's log level; start-up errors show their traceback at debug")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pagedserve")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve_parser(sub)
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    from pagedserve.benchmarks import serve as bench_serve

    bench_serve.add_arguments(bench.add_parser("serve", help="serving benchmark against an OpenAI-compatible URL"))
    gen = sub.add_parser("generate", help="complete one prompt and print it")
    gen.add_argument("model", nargs="?", default=None, help=_HELP["model"])
    gen.add_argument("--prompt", default="The capital of France is")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--sampling-seed", type=int, default=None)
    add_engine_args(gen)
    _add_log_level(gen)
    ns = parser.parse_args(argv)
    log_level = getattr(ns, "log_level", "info")
    logging.getLogger("pagedserve").setLevel(log_level.upper())
    try:
        if ns.command == "generate":
            _generate(ns)
        elif ns.command == "serve":
            sys.exit(_serve(ns))
        elif ns.command == "bench":
            bench_serve.main(ns)
    except ValueError as e:  # bad input: a bad flag value, a model path that is not there, a port in use
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # anything else that stops start-up: one line, the traceback at --log-level debug
        if log_level == "debug":
            raise
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
