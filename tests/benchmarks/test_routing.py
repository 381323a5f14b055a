"""benchmarks/routing.py's findings: ranked and marked from the figures, never typed in."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import routing  # noqa: E402


def run(hit_rate):
    return {"hit_rate": hit_rate}


def test_findings_rank_the_routers_and_mark_the_goals_from_the_figures():
    runs = {"one engine": run(0.80), "2 replicas, session": run(0.76), "2 replicas, prefix": run(0.78),
            "2 replicas, round-robin": run(0.50)}
    text = "\n".join(routing.routing_findings(runs))
    assert "best router first: prefix 78.0% (0.97x one engine's), session 76.0% (0.95x one engine's), " \
           "round-robin 50.0% (0.62x one engine's); one engine with the whole pool: 80.0%." in text
    assert "| 0.95x " in text and "| 76.0% vs 50.0% " in text and "not met" not in text

    runs["2 replicas, session"] = run(0.45)
    text = "\n".join(routing.routing_findings(runs))
    assert text.count("**not met**") == 2


def test_findings_say_nothing_without_the_single_engine_figure():
    assert routing.routing_findings({"one engine": run(None), "2 replicas, session": run(0.5)}) == []
