"""Grammar-constrained decoding (structured outputs) on a random-weight model: only the grammar makes its output
valid. Offline through LLM for the text, through EngineCore for the lifecycle (waiting for a compile, errors,
n > 1, preemption, prefix caching, neighbours), with both backends."""

import json
import re
import threading

import jsonschema
import pytest
import torch
from engine_utils import assert_all_blocks_free, make_engine, run_all

from pagedserve import LLM
from pagedserve.engine.protocol import AddRequest
from pagedserve.engine.request import RequestStatus
from pagedserve.engine.structured_output.backends import backend_class, choose_backend
from pagedserve.sampling_params import SamplingParams, StructuredOutputsParams

BACKENDS = ["xgrammar", "guidance"]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "enum": ["ann", "bob", "cy"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "admin": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 3},
    },
    "required": ["name", "age", "admin"],
    "additionalProperties": False,
}
REGEX = r"[0-9]{3}-[a-z]{2,5}"
CHOICES = ["yes", "no", "maybe not"]
EBNF = 'root ::= "(" item ("," item)* ")"\nitem ::= [a-c]+'
LARK = 'start: "[" NUM ("|" NUM)* "]"\nNUM: /[0-9]{1,3}/'
STRUCTURAL_TAG = json.dumps({
    "type": "structural_tag",
    "structures": [{"begin": "<f>", "schema": {"type": "object", "properties": {"x": {"type": "integer"}},
                                                "required": ["x"], "additionalProperties": False}, "end": "</f>"}],
    "triggers": ["<f"],
})


def constrained(max_tokens: int = 200, seed: int | None = 0, n: int = 1, **constraint) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens, n=n,
                          structured_outputs=StructuredOutputsParams(**constraint))


@pytest.fixture(scope="module", params=BACKENDS)
def llm(request, llama_dir) -> LLM:
    return LLM(llama_dir, dtype="float32", max_model_len=512, num_kv_blocks=256,
               structured_outputs_config={"backend": request.param})


def test_every_kind_of_constraint_gives_valid_output(llm):
    """Seeded temperature-1 sampling: each output is valid and ends where its grammar does (finish "stop")."""
    kinds = {
        "json": dict(json=PERSON), "json_text": dict(json=json.dumps(PERSON)), "regex": dict(regex=REGEX),
        "choice": dict(choice=CHOICES), "ebnf": dict(grammar=EBNF), "lark": dict(grammar=LARK),
    }
    prompts = ["The quick brown fox", "Paged attention keeps", "def add(a, b):"]
    names, params = zip(*[(name, constrained(seed=seed, **kind)) for name, kind in kinds.items() for seed in range(3)])
    outs = llm.generate([prompts[i % 3] for i in range(len(names))], list(params), use_tqdm=False)
    vocab = len(llm.get_tokenizer())
    for name, out in zip(names, outs):
        (c,) = out.outputs
        assert c.finish_reason == "stop", (name, c.text)
        assert max(c.token_ids) < vocab  # the model's vocabulary (512) is wider than the tokenizer's
        if name.startswith("json"):
            jsonschema.validate(json.loads(c.text), PERSON)
        elif name == "regex":
            assert re.fullmatch(REGEX, c.text), c.text
        elif name == "choice":
            assert c.text in CHOICES
        elif name == "ebnf":
            assert re.fullmatch(r"\([a-c]+(,[a-c]+)*\)", c.text), c.text
        else:
            assert re.fullmatch(r"\[[0-9]{1,3}(\|[0-9]{1,3})*\]", c.text), c.text
    assert len({o.outputs[0].text for o, n in zip(outs, names) if n == "json"}) > 1  # really sampled
    assert_no_requests_left(llm)


def test_json_object_and_structural_tag(llm):
    outs = llm.generate(["a", "b", "c", "d"], [constrained(seed=s, max_tokens=300, json_object=True)
                                               for s in range(4)], use_tqdm=False)
    finished = [o.outputs[0].text for o in outs if o.outputs[0].finish_reason == "stop"]
    assert finished  # any JSON may nest deeply: not every sample closes within max_tokens
    assert all(isinstance(json.loads(text), dict) for text in finished)
    out = llm.generate("x", constrained(max_tokens=60, structural_tag=STRUCTURAL_TAG), use_tqdm=False)[0].outputs[0]
    for body in re.findall(r"<f>(.*?)</f>", out.text, re.S):
        assert isinstance(json.loads(body)["x"], int)
    assert_no_requests_left(llm)


def test_default_whitespace_is_bounded(llm):
    """Random weights love whitespace: with it unbounded the JSON takes far longer to close; the default bound
    closes every sample well within 400 tokens."""
    schema = {"type": "object", "properties": {k: {"type": "integer", "minimum": 0, "maximum": 9} for k in "abcde"},
              "required": list("abcde"), "additionalProperties": False}
    prompts = [f"sample {i}" for i in range(8)]
    bounded = llm.generate(prompts, [constrained(seed=s, max_tokens=400, json=schema) for s in range(8)],
                           use_tqdm=False)
    assert all(o.outputs[0].finish_reason == "stop" for o in bounded)
    assert all(set(json.loads(o.outputs[0].text)) == set("abcde") for o in bounded)
    compact = llm.generate(prompts, [constrained(seed=s, json=schema, disable_any_whitespace=True) for s in range(8)],
                           use_tqdm=False)
    assert not any(re.search(r"\s\s|[\n\r\t]", o.outputs[0].text) for o in compact)  # at most ", " and ": "
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=400, structured_outputs=StructuredOutputsParams(
        json=schema, whitespace_pattern=r"[\x20\x0A\x0D\x09]*")) for s in range(8)]
    if llm.config.structured_outputs_backend == "xgrammar":  # xgrammar takes no whitespace pattern
        with pytest.raises(ValueError, match="whitespace_pattern needs the guidance backend"):
            llm.generate(prompts[0], params[0], use_tqdm=False)
        return
    unbounded = llm.generate(prompts, params, use_tqdm=False)
    lengths = [len(o.outputs[0].token_ids) for o in bounded]
    assert sum(len(o.outputs[0].token_ids) for o in unbounded) > 1.3 * sum(lengths)


def test_n_samples_each_follow_their_own_grammar_state(llm):
    """Sample i of an n=4 request samples what an n=1 request seeded seed + i samples (its matcher is its own)."""
    outs = llm.generate(["Continuous batching"] * 5, [constrained(seed=7, regex=REGEX, n=4)]
                        + [constrained(seed=7 + i, regex=REGEX) for i in range(4)], use_tqdm=False)
    samples = [c.text for c in outs[0].outputs]
    assert samples == [o.outputs[0].text for o in outs[1:]]
    assert all(re.fullmatch(REGEX, text) for text in samples) and len(set(samples)) > 1
    assert_no_requests_left(llm)


@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_constraints_raise_value_error_naming_the_problem(llama_dir, backend):
    llm = LLM(llama_dir, dtype="float32", max_model_len=128, num_kv_blocks=32,
              structured_outputs_config={"backend": backend})
    bad = {
        "json": (dict(json={"type": "objectx"}), "(?s)structured_outputs.json: invalid JSON schema: .*objectx"),
        "regex": (dict(regex="[a-"), "(?s)structured_outputs.regex: invalid regex: .*(Unclosed|unclosed)"),
        "grammar": (dict(grammar='start: "a" | b'), "(?s)structured_outputs.grammar: invalid grammar: .*unknown name"),
        "tag": (dict(structural_tag='{"structures": [], "triggers": ["<"]}'), '"structures" must be a non-empty'),
    }
    for constraint, message in bad.values():
        with pytest.raises(ValueError, match=message):
            llm.generate(["fine", "bad"], [SamplingParams(), constrained(**constraint)], use_tqdm=False)
        with pytest.raises(ValueError, match=message):
            llm.engine.add_request(AddRequest("r", [5, 6], constrained(**constraint)))
    for constraints in ({}, dict(regex="a", choice=["a"])):
        with pytest.raises(ValueError, match="exactly one of json, regex, choice"):
            SamplingParams(structured_outputs=constraints)
    assert not llm.engine.has_unfinished_requests()
    assert_all_blocks_free(llm.engine)


def test_auto_takes_guidance_for_what_xgrammar_cannot_do():
    lengthy = StructuredOutputsParams(json={"type": "string", "maxLength": 5})  # xgrammar #800
    assert choose_backend(lengthy, "auto") == "guidance"
    with pytest.raises(ValueError, match="xgrammar does not enforce maxLength"):
        choose_backend(lengthy, "xgrammar")
    special = StructuredOutputsParams(grammar='start: "a" <|im_end|>')
    assert choose_backend(special, "auto") == "guidance"
    spaced = StructuredOutputsParams(json={"type": "object"}, whitespace_pattern=" ?")
    assert choose_backend(spaced, "auto") == "guidance"
    assert choose_backend(StructuredOutputsParams(regex="a+"), "auto") == "xgrammar"
    with pytest.raises(ValueError, match="invalid regex"):  # both reject it: xgrammar's message
        choose_backend(StructuredOutputsParams(regex="(a)\\1"), "auto")


def test_backends_by_name_only():
    assert [backend_class(name).name for name in BACKENDS] == BACKENDS
    for name in ("auto", "outlines", "Guidance", ""):
        with pytest.raises(ValueError, match="unknown structured outputs backend"):
            backend_class(name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matcher_accepts_rolls_back_and_terminates_on_eos(llama_dir, backend):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    grammar_backend = backend_class(backend)(tokenizer, 512, (tokenizer.eos_token_id,))
    matcher = grammar_backend.new_matcher(grammar_backend.compile(StructuredOutputsParams(choice=["yes", "no"])))
    eos, yes = tokenizer.eos_token_id, tokenizer.encode("yes", add_special_tokens=False)

    def allowed() -> set[int]:
        bitmask = torch.zeros(2, 16, dtype=torch.int32)
        matcher.fill_bitmask(bitmask, 1)
        return {t for t in range(512) if bitmask[1, t // 32] >> (t % 32) & 1}

    start = allowed()
    assert eos not in start and yes[0] in start
    assert matcher.accept_tokens(yes) and allowed() == {eos}
    assert matcher.accept_tokens([eos]) and matcher.is_terminated()
    matcher.rollback(1)
    assert not matcher.is_terminated() and allowed() == {eos}
    matcher.rollback(len(yes))
    assert allowed() == start
    assert not matcher.accept_tokens(tokenizer.encode("maybe", add_special_tokens=False))


# ---- the lifecycle in the engine core -----------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_constrained_request_leaves_greedy_neighbours_unchanged(llama_dir, backend):
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    engine = make_engine(llama_dir, structured_outputs_config={"backend": backend})
    prompts = {"a": [5, 6, 7, 8], "b": [9, 10, 11]}
    for request_id, prompt in prompts.items():
        engine.add_request(AddRequest(request_id, prompt, greedy))
    alone = run_all(engine).tokens
    for request_id, prompt in prompts.items():
        engine.add_request(AddRequest(request_id, prompt, greedy))
    engine.add_request(AddRequest("c", [5, 6, 7, 8], constrained(json=PERSON)))
    engine.add_request(AddRequest("d", [12, 13], SamplingParams(temperature=0, max_tokens=40,
                                                     structured_outputs=StructuredOutputsParams(regex=REGEX))))
    together = run_all(engine)
    assert together.tokens[("a", 0)] == alone[("a", 0)] and together.tokens[("b", 0)] == alone[("b", 0)]
    assert together.finals[("c", 0)].finish_reason == together.finals[("d", 0)].finish_reason == "stop"


def test_grammar_end_finishes_with_stop_even_when_ignoring_eos(llama_dir):
    engine = make_engine(llama_dir)
    engine.add_request(AddRequest("a", [5, 6], SamplingParams(temperature=1.0, seed=3, max_tokens=50, ignore_eos=True,
                                                   structured_outputs=StructuredOutputsParams(choice=CHOICES))))
    run = run_all(engine)
    final = run.finals[("a", 0)]
    assert final.finish_reason == "stop" and run.tokens[("a", 0)][-1] == engine.eos_token_ids[0]


def test_a_request_waits_for_its_grammar_while_others_run(llama_dir, monkeypatch):
    engine = make_engine(llama_dir)
    release = threading.Event()
    compile_ = backend_class("xgrammar").compile

    def slow_compile(self, params):
        assert release.wait(10)
        return compile_(self, params)

    monkeypatch.setattr(backend_class("xgrammar"), "compile", slow_compile)
    engine.add_request(AddRequest("constrained", [5, 6, 7], constrained(seed=1, choice=CHOICES, n=2)))
    engine.add_request(AddRequest("free", [8, 9], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)))
    waiting = engine.requests["constrained"][0]
    for _ in range(3):
        outputs = engine.step()
        assert [o.request_id for o in outputs] == ["free"] and waiting.status == RequestStatus.WAITING_FOR_GRAMMAR
    assert not engine.step()  # nothing runnable: the step waits briefly for the compile instead of spinning
    release.set()
    run = run_all(engine)
    assert all(run.finals[("constrained", i)].finish_reason == "stop" for i in range(2))


def test_a_grammar_that_fails_to_compile_fails_its_request(llama_dir, monkeypatch):
    engine = make_engine(llama_dir)

    def broken(self, params):
        raise RuntimeError("out of grammar memory")

    monkeypatch.setattr(backend_class("xgrammar"), "compile", broken)
    engine.add_request(AddRequest("bad", [5, 6], constrained(seed=1, regex="a+", n=2)))
    engine.add_request(AddRequest("fine", [5, 6], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)))
    run = run_all(engine)
    for i in range(2):
        assert run.finals[("bad", i)].finish_reason == "error"
        assert "out of grammar memory" in run.finals[("bad", i)].error
    assert run.finals[("fine", 0)].finish_reason == "length"


def test_abort_while_compiling_leaks_nothing(llama_dir):
    engine = make_engine(llama_dir)
    engine.add_request(AddRequest("a", [5, 6], constrained(regex=REGEX, n=3)))
    engine.stop_samples([("a", 0)])  # its successor waits for the same grammar
    assert engine.requests["a"][0].status == RequestStatus.WAITING_FOR_GRAMMAR
    engine.abort_requests(["a"])
    run_all(engine)
    assert not engine.structured_output.matchers and not engine.structured_output.compiling


@pytest.mark.parametrize("backend", BACKENDS)
def test_preemption_chunked_prefill_and_prefix_caching_keep_the_grammar_state(llama_dir, backend):
    """A tiny KV pool preempts constrained requests mid-output (they recompute prompt + output, their matchers
    stay where they were); long prompts are prefilled in chunks; a shared prefix is served from the cache. Each
    sample's tokens equal those of a run with room to spare."""
    prefix = list(range(20, 60))
    prompts = {f"r{i}": prefix + [100 + i] * (i + 1) for i in range(6)}
    kinds = [dict(json=PERSON), dict(regex=REGEX), dict(grammar=EBNF)]

    def run(**engine_args):
        engine = make_engine(llama_dir, structured_outputs_config={"backend": backend}, **engine_args)
        for i, (request_id, prompt) in enumerate(prompts.items()):
            engine.add_request(AddRequest(request_id, prompt, constrained(seed=i, max_tokens=60, **kinds[i % 3])))
        return engine, run_all(engine)

    _, roomy = run(enable_prefix_caching=False)
    engine, tight = run(num_kv_blocks=8, max_num_batched_tokens=24)
    assert engine.stats().num_preemptions > 0 and engine.stats().prefix_cache_hits > 0
    assert tight.tokens == roomy.tokens
    assert all(final.finish_reason in ("stop", "length") for final in tight.finals.values())
    assert sum(final.finish_reason == "stop" for final in tight.finals.values()) >= 4


def assert_no_requests_left(llm: LLM) -> None:
    assert not llm.engine.has_unfinished_requests()
    assert not llm.engine.structured_output.matchers and not llm.engine.structured_output.compiling
    assert_all_blocks_free(llm.engine)


def test_a_compile_that_takes_too_long_fails_its_request(llama_dir, monkeypatch):
    import pagedserve.engine.structured_output.manager as manager

    engine = make_engine(llama_dir)
    release = threading.Event()
    compile_ = backend_class("xgrammar").compile
    monkeypatch.setattr(backend_class("xgrammar"), "compile", lambda self, params: release.wait(10)
                        and compile_(self, params))
    monkeypatch.setattr(manager, "COMPILE_TIMEOUT_S", 0.0)
    engine.add_request(AddRequest("slow", [5, 6], constrained(regex=REGEX)))
    run = run_all(engine)
    release.set()
    assert run.finals[("slow", 0)].finish_reason == "error"
    assert "did not compile within" in run.finals[("slow", 0)].error


def test_a_compile_failure_is_the_clients_error_and_one_slow_compile_holds_up_no_other(llama_dir, monkeypatch):
    """A grammar that fails to compile (or in time) is the request's own input: error_kind "input" (a 400 in the
    server). Compiles run on several threads: a grammar stuck compiling does not delay another one."""
    engine = make_engine(llama_dir)
    release = threading.Event()
    compile_ = backend_class("xgrammar").compile

    def compile_or_fail(self, params):
        if params.regex == "stuck":
            assert release.wait(30)
        if params.regex == "b+":
            raise ValueError("structured_outputs: this grammar cannot be compiled")
        return compile_(self, params)

    monkeypatch.setattr(backend_class("xgrammar"), "compile", compile_or_fail)
    engine.add_request(AddRequest("stuck", [5, 6], constrained(regex="stuck")))
    engine.add_request(AddRequest("bad", [5, 6], constrained(regex="b+")))
    engine.add_request(AddRequest("fine", [5, 6], constrained(regex="a+", max_tokens=3)))
    outputs = []
    for _ in range(200):
        outputs += engine.step()
        if {"bad", "fine"} <= {o.request_id for o in outputs if o.finish_reason}:
            break
    release.set()
    run_all(engine)
    finals = {o.request_id: o for o in outputs if o.finish_reason}
    assert finals["bad"].finish_reason == "error" and finals["bad"].error_kind == "input"
    assert finals["fine"].finish_reason in ("stop", "length")  # while "stuck" was still compiling
    # the caches hold the constraint's digest, not its text
    assert all(len(digest) == 32 for digest, _ in engine.structured_output._grammars)


def test_the_backend_choice_is_cached_by_digest():
    from pagedserve.engine.structured_output import backends

    big = StructuredOutputsParams(json={"type": "object", "description": "x" * 100_000})
    assert choose_backend(big, "auto") == "xgrammar"
    assert (backends.constraint_digest(big), "auto") in backends._CHOICES
    assert all(len(digest) == 32 for digest, _ in backends._CHOICES)
