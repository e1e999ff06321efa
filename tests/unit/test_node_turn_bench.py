"""``bench.node_turn``: one get's turn through the node core, timers every turn or paced.

Only that it runs and answers every get in its turn (it raises otherwise); the figures
are a benchmark's, printed, never asserted."""

from __future__ import annotations

import json

from bench import node_turn


def test_both_shapes_answer_every_get_and_report_a_ratio() -> None:
    result = node_turn.measure(turns=300, repeat=1, gap_s=0.0005)
    assert set(result) == {"every_turn_us", "paced_us", "paced_ratio"}
    assert result["every_turn_us"] > 0 and result["paced_us"] > 0
    assert result["paced_ratio"] == result["paced_us"] / result["every_turn_us"]


def test_the_cli_prints_json(capsys) -> None:  # type: ignore[no-untyped-def]
    assert node_turn.main(["--turns", "50", "--repeat", "1", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"every_turn_us", "paced_us",
                                                        "paced_ratio"}
