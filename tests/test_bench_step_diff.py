"""bench.step_diff: the before/after verdict against the runs' spread, and the table from files."""

from __future__ import annotations

import json

from memopt.recipes.bench import step_diff


def test_verdict_compares_the_gap_with_the_larger_spread():
    assert step_diff.verdict([1.00, 1.02], [1.01, 1.03]) == "within spread"
    assert step_diff.verdict([1.00, 1.02], [1.10, 1.11]) == "worse"      # gap 0.08 > 0.02
    assert step_diff.verdict([1.10, 1.11], [1.00, 1.02]) == "better"
    assert step_diff.verdict([1.00, 1.20], [1.25, 1.26]) == "within spread"  # gap 0.05 < 0.2
    assert step_diff.verdict([], [1.0]) == "-"


def write_run(path, rows):
    path.write_text(json.dumps({"rows": [{"optimizer": n, "vs_fused_adamw": v}
                                         for n, v in rows.items()]}))
    return str(path)


def test_table_and_check_flag_a_memopt_regression(tmp_path, capsys):
    before = [write_run(tmp_path / f"b{i}.json", {"memopt A": 1.50 + i / 100, "peer": 3.0,
                                                  "memopt gone": 2.0}) for i in range(2)]
    after = [write_run(tmp_path / f"a{i}.json", {"memopt A": 1.80 + i / 100, "peer": 3.5})
             for i in range(2)]
    assert step_diff.main(["--before", *before, "--after", *after]) == 0
    assert step_diff.main(["--before", *before, "--after", *after, "--check"]) == 1
    out = capsys.readouterr().out
    assert "| memopt A | 1.500 / 1.510 | 1.800 / 1.810 | +19.9% | worse |" in out
    assert "| memopt gone | 2.000 / 2.000 | - | - | - |" in out
    assert "worse beyond the spread: memopt A\n" in out      # the peer is not named
