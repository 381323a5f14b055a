"""The agent workload of benchmarks/multi_turn.py against the fake server, and BENCHMARKS.md sections."""

import os
import subprocess
import sys

import pytest
from conftest import make_tokenizer
from fake_openai_server import FakeOpenAIServer, serving
from transformers import AutoTokenizer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import multi_turn  # noqa: E402
import report  # noqa: E402
from report import replace_section  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tokenizer"))
    make_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def small_workload(tokenizer, **overrides) -> multi_turn.Workload:
    head = len(tokenizer.encode(multi_turn.SYSTEM_HEAD, add_special_tokens=False))
    fields = dict(sessions=3, turns=4, system_tokens=head + 40, message_tokens=(5, 12), output_tokens=(2, 4), seed=3)
    return multi_turn.Workload(**{**fields, **overrides})


def count(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def test_sessions_are_seeded_and_sized(tokenizer):
    workload = small_workload(tokenizer)
    system, sessions = multi_turn.build_sessions(tokenizer, workload)
    assert (system, sessions) == multi_turn.build_sessions(tokenizer, workload)
    assert (system, sessions) != multi_turn.build_sessions(tokenizer, small_workload(tokenizer, seed=4))
    assert system.startswith(multi_turn.SYSTEM_HEAD)
    assert abs(count(tokenizer, system) - workload.system_tokens) <= 2  # the seam may merge a token or two
    assert len(sessions) == 3
    for turns in sessions:
        assert [t.role for t in turns] == ["user", "tool", "user", "tool"]
        for t in turns:
            assert 5 <= count(tokenizer, t.content) <= 12
            assert 2 <= t.max_tokens <= 4
    assert len({t.content for turns in sessions for t in turns}) == 12


def test_a_system_prompt_shorter_than_the_tools_is_a_value_error(tokenizer):
    with pytest.raises(ValueError, match="system_tokens"):
        multi_turn.build_sessions(tokenizer, small_workload(tokenizer, system_tokens=10))


def test_workload_end_to_end(tokenizer, tokenizer_dir):
    fake = FakeOpenAIServer(tokenizer, ttft_s=0.05, itl_s=0.01)
    workload = small_workload(tokenizer)
    with serving(fake) as base_url:
        result = multi_turn.run_workload(base_url, workload, tokenizer_path=tokenizer_dir, show_progress=False)

    system, sessions = multi_turn.build_sessions(tokenizer, workload)
    warmup, *turns = fake.payloads
    assert len(turns) == result["requests"] == 12
    assert result["output_tokens"] == sum(t.max_tokens for s in sessions for t in s)  # ignore_eos honoured
    for payload in turns:
        assert payload["ignore_eos"] and payload["stream"] and payload["model"] == "fake-model"
        messages = payload["messages"]
        assert messages[0] == {"role": "system", "content": system}
        # System, then per earlier turn its message and the assistant's streamed reply, then this turn's message.
        assert len(messages) % 2 == 0
        for message, reply in zip(messages[1:-1:2], messages[2:-1:2]):
            assert reply["role"] == "assistant"
            assert reply["content"] == "".join(f" w{i}" for i in range(len(reply["content"].split())))
            assert message["role"] in ("user", "tool")
        if messages[-1]["role"] == "tool":
            assert messages[-1]["tool_call_id"].startswith("call_")
    # Metrics are the deltas over the workload: the warm-up request is left out.
    prompts = [sum(count(tokenizer, m["content"]) for m in p["messages"]) for p in turns]
    assert result["prompt_tokens"] == result["prefix_cache_queries"] == sum(prompts)
    assert result["prefix_cache_hits"] == sum(p // 2 for p in prompts)
    assert result["hit_rate"] == pytest.approx(result["prefix_cache_hits"] / sum(prompts))
    assert result["computed_prompt_tokens"] == sum(prompts) - result["prefix_cache_hits"]
    assert [t["turn"] for t in result["ttft_by_turn"]] == [1, 2, 3, 4]
    assert all(t["mean_ms"] >= 50 for t in result["ttft_by_turn"])  # the server waits 50 ms for a first token
    assert result["output_throughput"] == pytest.approx(result["output_tokens"] / result["total_s"])

    table = multi_turn.report_tables({"run": result})
    assert "prefix-cache hit rate" in table and f"{100 * result['hit_rate']:.1f}%" in table


def fake_result(turn1_ms: float, last_ms: float, hit_rate: float | None, total_s: float) -> dict:
    return {"ttft_by_turn": [{"turn": 1, "mean_ms": turn1_ms, "p99_ms": turn1_ms},
                             {"turn": 8, "mean_ms": last_ms, "p99_ms": last_ms}],
            "hit_rate": hit_rate, "total_s": total_s}


def test_goals():
    met = multi_turn.goal_rows(fake_result(100, 149, 0.9, 10), fake_result(0, 0, 0.5, 12.5))
    assert [row[1:] for row in met] == [["1.49x", "met"], ["90.0%", "met"], ["1.25x", "met"]]
    missed = multi_turn.goal_rows(fake_result(100, 151, 0.85, 10), fake_result(0, 0, 0.5, 12))
    assert [row[1:] for row in missed] == [["1.51x", "**not met**"], ["85.0%", "**not met**"],
                                           ["1.20x", "**not met**"]]
    assert len(multi_turn.goal_rows(fake_result(100, 100, None, 10))) == 1  # no hit rate, no vLLM run


def test_replace_section(tmp_path):
    path = str(tmp_path / "BENCHMARKS.md")
    replace_section(path, "serving", "first", commit="abc")
    assert open(path).read() == "<!-- section: serving -->\nfirst\n\nMeasured at commit `abc`.\n<!-- end: serving -->\n"

    with open(path, "w") as f:
        f.write("# Title\n\nintro\n")
    replace_section(path, "serving", "table v1\n", commit="abc")
    replace_section(path, "peers", "peers v1", commit="abc")
    replace_section(path, "serving", "table v2", commit="def")
    assert open(path).read() == (
        "# Title\n\nintro\n\n"
        "<!-- section: serving -->\ntable v2\n\nMeasured at commit `def`.\n<!-- end: serving -->\n\n"
        "<!-- section: peers -->\npeers v1\n\nMeasured at commit `abc`.\n<!-- end: peers -->\n"
    )

    with open(path, "a") as f:
        f.write("<!-- section: broken -->\nno end marker\n")
    with pytest.raises(ValueError, match="no '<!-- end: broken -->'"):
        replace_section(path, "broken", "x")


def test_measured_commit_names_head_and_uncommitted_changes(tmp_path):
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True,
                              text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "BENCHMARKS.md").write_text("figures\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    head = git("rev-parse", "--short=12", "HEAD")
    assert report.measured_commit(str(tmp_path)) == head
    (tmp_path / "BENCHMARKS.md").write_text("new figures\n")  # the report itself does not count
    assert report.measured_commit(str(tmp_path)) == head
    (tmp_path / "code.py").write_text("x = 2\n")
    assert report.measured_commit(str(tmp_path)) == f"{head} + uncommitted changes"
    assert report.measured_commit(str(tmp_path / "missing")) == "unknown"


def test_a_quick_section_never_reaches_the_repository_report(tmp_path, monkeypatch, capsys):
    target = tmp_path / "BENCHMARKS.md"
    target.write_text("kept\n")
    monkeypatch.setattr(report, "REPO_BENCHMARKS", str(target))
    replace_section(str(target), "routing", f"## Routing\n\n{report.QUICK_WARNING}\n", commit="abc")
    assert target.read_text() == "kept\n"
    assert "not written" in capsys.readouterr().err
    replace_section(str(target), "routing", "## Routing\n", commit="abc")  # a full run is written
    assert "## Routing" in target.read_text()


def test_the_committed_report_has_no_quick_section_and_every_section_names_its_commit():
    with open(report.REPO_BENCHMARKS) as f:
        text = f.read()
    assert report.QUICK_WARNING not in text
    sections = text.split("<!-- section: ")[1:]
    assert sections
    for section in sections:
        name = section.split(" -->", 1)[0]
        assert "Measured at commit `" in section or "Figures committed in `" in section, name
