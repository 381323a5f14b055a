"""AsyncLLM in-process: streaming kinds, abort, engine faults that fail only their own requests."""

import asyncio

import pytest

from pagedserve import LLM, EngineArgs, SamplingParams
from pagedserve.frontend.async_llm import AsyncLLM
from pagedserve.sampling_params import RequestOutputKind


@pytest.fixture(scope="module")
def args(llama_dir):
    return EngineArgs(model=llama_dir, dtype="float32", max_model_len=256, num_kv_blocks=64)


def run(coro):
    return asyncio.run(coro)


async def collect(engine, prompt, params, request_id):
    return [out async for out in engine.generate(prompt, params, request_id)]


def test_output_kinds(args, llama_dir):
    expected = LLM(llama_dir, dtype="float32", max_model_len=256, num_kv_blocks=64).generate(
        "The quick", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)[0].outputs[0]

    async def main():
        engine = AsyncLLM(args)
        try:
            results = {}
            for kind in RequestOutputKind:
                params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, output_kind=kind)
                results[kind] = await collect(engine, "The quick", params, f"r-{kind.name}")
            return results
        finally:
            await engine.shutdown()

    results = run(main())
    deltas = results[RequestOutputKind.DELTA]
    assert "".join(o.outputs[0].text for o in deltas) == expected.text
    assert sum((o.outputs[0].token_ids for o in deltas), []) == expected.token_ids
    assert [o.finished for o in deltas] == [False] * (len(deltas) - 1) + [True]
    cumulative = results[RequestOutputKind.CUMULATIVE]
    assert [len(o.outputs[0].token_ids) for o in cumulative] == list(range(1, 9))
    assert cumulative[-1].outputs[0].text == expected.text
    (final,) = results[RequestOutputKind.FINAL_ONLY]
    assert final.finished and final.outputs[0].token_ids == expected.token_ids


def test_breaking_out_aborts_and_frees_blocks(args):
    async def main():
        engine = AsyncLLM(args)
        try:
            params = SamplingParams(max_tokens=200, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
            async for out in engine.generate("The quick", params, "long"):
                if len(out.outputs[0].token_ids) >= 1:
                    break
            stats = await engine.engine_stats()
            while stats.num_requests_running or stats.num_requests_waiting:
                stats = await engine.engine_stats()
            return stats, engine.num_unfinished_requests
        finally:
            await engine.shutdown()

    stats, unfinished = run(main())
    assert unfinished == 0
    assert stats.num_kv_blocks_free == stats.num_kv_blocks_total


def test_engine_fault_fails_only_its_requests(args):
    async def main():
        engine = AsyncLLM(args, "thread")
        await engine.start()
        try:
            runner = engine.client.core.model_runner
            real_execute = runner.execute
            calls = {"n": 0}

            def flaky(sched, req_ids):
                calls["n"] += 1
                if calls["n"] == 1:
                    raise RuntimeError("injected fault")
                return real_execute(sched, req_ids)

            runner.execute = flaky
            params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True,
                                    output_kind=RequestOutputKind.FINAL_ONLY)
            (failed,) = await collect(engine, "a", params, "victim")
            (ok,) = await collect(engine, "b", params, "survivor")
            stats = await engine.engine_stats()
            return failed, ok, stats
        finally:
            await engine.shutdown()

    failed, ok, stats = run(main())
    assert failed.outputs[0].finish_reason == "error"
    assert ok.outputs[0].finish_reason == "length" and len(ok.outputs[0].token_ids) == 4
    assert stats.num_kv_blocks_free == stats.num_kv_blocks_total


def test_bad_input_raises_value_error(args):
    async def main():
        engine = AsyncLLM(args)
        try:
            with pytest.raises(ValueError, match="max_model_len"):
                await collect(engine, {"prompt_token_ids": [5] * 300}, SamplingParams(), "too-long")
            with pytest.raises(ValueError, match="already in use"):
                gen = engine.generate("x", SamplingParams(max_tokens=50, ignore_eos=True), "dup")
                await gen.__anext__()
                await collect(engine, "y", SamplingParams(), "dup")
            await gen.aclose()
        finally:
            await engine.shutdown()

    run(main())


def test_a_request_that_cannot_be_sent_leaves_nothing_behind(args):
    """If handing a request to the engine fails (an encoder error, say), it holds no waiting slot and no
    stream: a handful of them cannot fill the bounded queue."""

    async def main():
        engine = AsyncLLM(args, "thread", max_waiting_requests=0)
        await engine.start()
        try:
            real_send = engine.client.send

            def broken(message):
                raise OverflowError("cannot encode")

            engine.client.send = broken
            for i in range(5):
                with pytest.raises(OverflowError):
                    request = engine.input_processor.make_request("x", SamplingParams(max_tokens=2), f"r{i}")
                    engine.add_request(request)
            assert engine.num_unfinished_requests == 0 and not engine.streams
            engine.client.send = real_send
            outputs = [out async for out in engine.generate("x", SamplingParams(max_tokens=2), "ok")]
            return outputs[-1]
        finally:
            await engine.shutdown()

    final = run(main())
    assert final.finished and len(final.outputs[0].token_ids) == 2


@pytest.mark.parametrize("placement", ["thread", "process"])
def test_a_lease_expires_while_the_engine_is_idle(args, placement):
    """A lease ends at its TTL although no request follows: the engine wakes for it, the gauges say so, the
    prefix cache can be reset, and only the session's own tenant (cache_salt) can close it."""

    async def main():
        engine = AsyncLLM(args, placement)
        await engine.start()
        try:
            params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
            request = engine.input_processor.make_request("The quick brown fox " * 6, params, "t1",
                                                          session_id="s", kv_retention_s=0.5, cache_salt="a")
            [out async for out in engine.add_request(request)]
            leased = engine.stats.num_session_leases, engine.metrics.session_leases._value.get()
            tenant_b_closed = await engine.close_session("s", "b")
            await asyncio.sleep(1.5)  # no request, no engine call: the gauges must move by themselves
            idle = engine.stats.num_session_leases, engine.metrics.session_leases._value.get()
            expiries = engine.metrics.lease_expiries._value.get()
            return leased, tenant_b_closed, idle, expiries, await engine.reset_prefix_cache(), \
                await engine.close_session("s", "a")
        finally:
            await engine.shutdown()

    leased, tenant_b_closed, idle, expiries, reset, closed = run(main())
    assert leased == (1, 1) and not tenant_b_closed
    assert idle == (0, 0) and expiries == 1
    assert reset and closed


def test_an_output_handling_fault_fails_only_its_request(args):
    """Detokenizing (or decoding a logprob of) one request's output raises: that request ends with
    finish_reason "error" and is aborted in the engine; the others, and the output pump, go on."""

    async def main():
        engine = AsyncLLM(args)
        await engine.start()
        try:
            real_apply = engine.processor._apply

            def apply(state, sample, core_out, now):
                if state.request_id == "victim":
                    raise RuntimeError("injected decode fault")
                return real_apply(state, sample, core_out, now)

            engine.processor._apply = apply
            victim = SamplingParams(max_tokens=200, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)
            survivor = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True,
                                      output_kind=RequestOutputKind.FINAL_ONLY)
            (failed,), (ok,) = await asyncio.wait_for(asyncio.gather(
                collect(engine, "a", victim, "victim"), collect(engine, "b", survivor, "survivor")), 30)
            (again,) = await asyncio.wait_for(collect(engine, "c", survivor, "after"), 30)
            stats = await engine.engine_stats()
            return failed, ok, again, stats, engine.errored
        finally:
            await engine.shutdown()

    failed, ok, again, stats, errored = run(main())
    assert failed.outputs[0].finish_reason == "error"
    assert ok.outputs[0].finish_reason == "length" and again.outputs[0].finish_reason == "length"
    assert errored is None and stats.num_requests_running == 0
    assert stats.num_kv_blocks_free == stats.num_kv_blocks_total


@pytest.mark.parametrize("placement", ["process", "thread"])
def test_an_output_handling_fault_outside_any_request_restarts_the_engine(args, placement):
    """A fault in handling a step's outputs that belongs to no request (a metric, say) is an engine death: the
    open requests fail at once with EngineDeadError and the engine is restarted, never a silent stall."""
    from pagedserve.frontend.async_llm import EngineDeadError

    async def main():
        engine = AsyncLLM(args, placement)
        await engine.start()
        try:
            real_record = engine.metrics.record_new_tokens
            faults = {"left": 1}

            def record(count):
                if faults["left"]:
                    faults["left"] -= 1
                    raise RuntimeError("injected metric fault")
                real_record(count)

            engine.metrics.record_new_tokens = record
            params = SamplingParams(max_tokens=50, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)
            with pytest.raises(EngineDeadError, match="injected metric fault"):
                await asyncio.wait_for(collect(engine, "a", params, "victim"), 30)
            deadline = asyncio.get_running_loop().time() + 30
            while engine.errored:  # restarted after a back-off
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.1)
            (ok,) = await asyncio.wait_for(collect(engine, "b", params, "after"), 30)
            return ok, engine.metrics
        finally:
            await engine.shutdown()

    ok, metrics = run(main())
    assert ok.outputs[0].finish_reason == "length" and len(ok.outputs[0].token_ids) == 50


@pytest.mark.parametrize("outputs_read", [0, 1])
def test_a_stream_dropped_unfinished_is_aborted(args, outputs_read):
    """A client that goes away before the first output (its stream never iterated), or after one, leaves nothing:
    the request is aborted in the engine and its stream forgotten."""

    async def main():
        engine = AsyncLLM(args)
        await engine.start()
        try:
            params = SamplingParams(max_tokens=200, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
            stream = engine.add_request(engine.input_processor.make_request("x", params, "dropped"))
            for _ in range(outputs_read):
                await stream.__anext__()
            del stream
            await asyncio.sleep(0)  # the abort runs on the loop
            left = dict(engine.streams), engine.num_unfinished_requests
            return left, await engine.engine_stats()
        finally:
            await engine.shutdown()

    (streams, unfinished), stats = run(main())
    assert streams == {} and unfinished == 0
    assert stats.num_requests_running == stats.num_requests_waiting == 0
    assert stats.num_kv_blocks_free == stats.num_kv_blocks_total
