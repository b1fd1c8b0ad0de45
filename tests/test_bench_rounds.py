"""The one way the benchmarks measure a cell (rounds.py) and what e2e, synthetic and
lm-head report from it: interleaving, pilot-sized passes, intervals, calls, targets,
resuming (no engine)."""

from __future__ import annotations

import json

from coral_vllm.bench import e2e, synthetic
from coral_vllm.bench.rounds import (cell_lines, compare, every_cell_target,
                                     measure_rounds, measurement_row, target)


def test_rounds_interleave_in_rotated_order_after_a_pilot_that_sizes_the_passes():
    calls = []
    per_pass = {"A": 0.5, "B": 0.8, "C": 1.0}

    def measure(v, passes):
        calls.append((v, passes))
        return {"wall_s": per_pass[v] * passes, "output_tok_s": 10.0 / per_pass[v]}

    runs, passes = measure_rounds("ABC", measure, rounds=5, min_seconds=2.0)
    assert passes == [5] * 5  # ceil(1.1 * 2 s / 0.5 s): the fastest variant lasts >= 2 s too
    assert calls[:3] == [("A", 1), ("B", 1), ("C", 1)]  # the pilot, not reported
    assert ["".join(v for v, _ in calls[3 + 3 * r:6 + 3 * r]) for r in range(5)] == \
        ["ABC", "BCA", "CAB", "ABC", "BCA"]
    assert {p for _, p in calls[3:]} == {5} and all(len(r) == 5 for r in runs.values())
    assert measurement_row(runs["A"])["shortest_wall_s"] == 2.5
    calls.clear()
    assert measure_rounds("AB", measure, rounds=2)[1] == [1, 1] and len(calls) == 4  # no pilot
    seen = []

    def slow_pilot(v, passes):  # every first pass (the pilot) slower than the later ones
        seen.append(v)
        per = 0.5 if seen.count(v) == 1 else {"A": 0.25, "B": 0.8}[v]
        return {"wall_s": per * passes}

    runs, passes = measure_rounds("AB", slow_pilot, rounds=3, min_seconds=2.0)
    # pilot: ceil(2.2 / 0.5) = 5; round 1 left A at 5 x 0.25 = 1.25 s: ceil(2.2 / 0.25) = 9
    assert passes == [5, 9, 9] and runs["A"][0]["wall_s"] == 1.25
    assert min(m["wall_s"] for m in runs["A"][1:]) >= 2.0


def test_a_cell_calls_a_difference_only_where_the_variants_intervals_are_disjoint():
    eagle = [100.0, 120.0, 90.0, 110.0, 105.0]
    values = {"plain": [50.0, 52.0, 49.0, 51.0, 50.0], "eagle": eagle,
              "coral": [x * 1.1 for x in eagle]}
    pairs = {"coral_vs_eagle": ("coral", "eagle"), "eagle_vs_plain": ("eagle", "plain"),
             "coral_vs_static": ("coral", "static")}
    cell = compare(values, pairs)
    assert cell["coral_vs_eagle"] == 1.1 and "coral_vs_static" not in cell
    iv = cell["intervals"]
    assert iv["variants"]["eagle"]["interval"] == [90.0, 120.0]
    # paired round by round CORAL is 1.1x in every round, but the variants' own
    # intervals overlap: the table calls no difference, and says the paired ratio would
    assert iv["ratios"]["coral_vs_eagle"]["call"] == "higher"
    assert iv["ratios"]["coral_vs_eagle"]["difference"] == "same"
    assert iv["ratios"]["eagle_vs_plain"]["difference"] == "higher"
    text = "\n".join(cell_lines("s batch 1", cell, "tok/s"))
    assert "5 rounds" in text and "93.75%" in text and "eagle 105 [90, 120]" in text
    assert "coral_vs_eagle 1.1 [1.1, 1.1] same (paired ratio alone: higher)" in text
    assert compare({"a": [2.0], "b": [1.0]}, {"a_vs_b": ("a", "b")}) == {"a_vs_b": 2.0}
    assert "no interval" in cell_lines("one", {"a_vs_b": 2.0}, "tok/s")[0]


def _synthetic_rows(batch, tok_s):
    return [{"shape": "s", "drafter": d, "batch": batch,
             "synthetic_acceptance_length": None if d == "plain" else 3.5,
             "output_tok_s": sorted(v)[2], "output_tok_s_rounds": v}
            for d, v in tok_s.items()]


def test_synthetic_targets_are_met_only_where_the_whole_interval_clears_the_bar():
    rows = _synthetic_rows(1, {"plain": [100] * 5, "eagle": [200, 210, 190, 205, 200],
                               "static": [230, 240, 220, 235, 230],
                               "coral": [240, 250, 230, 247, 238]})
    rows += _synthetic_rows(64, {"plain": [900] * 5, "eagle": [1000, 1100, 950, 1000, 1020],
                                 "static": [1100, 1150, 1120, 1130, 1140],
                                 "coral": [990, 1080, 980, 1010, 990]})
    cells = synthetic.ratios(rows, k=5)
    assert [c["batch"] for c in cells] == [1, 64] and "c_coral" in cells[0]
    calls = {(t["target"].split(", ")[1], t["target"].split(": ")[1]): t["call"]
             for t in synthetic.check_targets(cells, k=5)}
    assert calls == {
        ("batch 1", "CORAL >= 1.15x dense-head EAGLE"): "met",       # [1.19, 1.205]
        ("batch 1", "CORAL >= 0.98x dense-head EAGLE"): "met",
        ("batch 1", "CORAL no slower than the static-vocabulary drafter"): "met",
        ("batch 64", "CORAL >= 0.98x dense-head EAGLE"): "undecided",  # [0.97, 1.03]
        ("batch 64", "CORAL no slower than the static-vocabulary drafter"): "missed"}
    one = target("t", {"r": 1.3}, "r", 1.2)  # one round: the value is the interval
    assert (one["call"], one["interval"]) == ("met", [1.3, 1.3])
    worst = every_cell_target("coral >= 0.98x eagle", cells, "coral_vs_eagle", 0.98,
                              lambda c: f"batch {c['batch']}")
    assert worst["call"] == "undecided" and worst["cells_met"] == 1
    assert worst["target"].endswith("(worst: batch 64)")


def test_e2e_cells_pair_every_drafter_with_plain_and_coral_with_every_drafter():
    def row(d, conc, tok_s):
        return {"drafter": d, "dataset": "mtbench", "temperature": 0.0, "concurrency": conc,
                "output_tok_s": sorted(tok_s)[2], "output_tok_s_rounds": tok_s,
                "tpot_ms": None, "acceptance_length": None}

    rows = [row("plain", 1, [100, 90, 110, 100, 105]), row("hass", 1, [150, 140, 160, 150, 155]),
            row("coral", 1, [180, 171, 190, 183, 186])]
    s = e2e.summarize(rows, k=3)
    [cell] = s["ratios"]
    assert set(cell["intervals"]["ratios"]) == {"hass_vs_plain", "coral_vs_plain",
                                                "coral_vs_hass"}
    assert [r["speedup_vs_plain"] for r in rows] == [1.0, cell["hass_vs_plain"],
                                                     cell["coral_vs_plain"]]
    got = {t["target"]: t["call"] for t in e2e.check_targets(s["ratios"])}
    assert got == {"MT-bench, batch 1, T=0: CORAL >= 2.0x plain": "missed",
                   "MT-bench, batch 1, T=0: CORAL >= 1.10x HASS": "met"}


def test_e2e_targets_follow_the_dataset_and_the_speedup_bar():
    """HumanEval cells at batch 1 and 32 (the Qwen issue's table): the bar over plain is
    `--speedup-target`, CORAL is held against the dense-head and static drafters, and a
    T=1 cell carries no target."""
    def row(d, conc, t, tok_s):
        return {"drafter": d, "dataset": "humaneval", "temperature": t, "concurrency": conc,
                "output_tok_s": sorted(tok_s)[2], "output_tok_s_rounds": tok_s,
                "tpot_ms": None, "acceptance_length": None}

    rows = [row(d, conc, t, [base * f for f in (1.0, 0.98, 1.02, 1.01, 0.99)])
            for conc in (1, 32) for t in (0.0, 1.0)
            for d, base in (("plain", 100), ("coral", 150), ("dense-head", 120), ("static", 160))]
    got = {t["target"]: t["call"]
           for t in e2e.check_targets(e2e.summarize(rows, k=5)["ratios"], speedup=1.4)}
    assert got == {"HumanEval, batch 1, T=0: CORAL >= 1.4x plain": "met",
                   "HumanEval, batch 1, T=0: CORAL >= 1.10x the dense-head drafter": "met",
                   "HumanEval, batch 1, T=0: CORAL >= the static-vocabulary drafter": "missed",
                   "HumanEval, concurrency 32, T=0: CORAL >= the static-vocabulary drafter":
                   "missed"}


def test_synthetic_resume_keeps_only_the_finished_shapes_of_a_run_with_the_same_settings(
        tmp_path, capsys):
    settings = {key: 1 for key in synthetic.COMPARABLE}
    prior = {**settings, "shapes_done": ["a"], "rows": [{"shape": "a"}, {"shape": "b"}],
             **{key: {"a": 1, "b": 2} for key in ("shapes", "startup_s", "static_rows",
                                                  "passes")}}
    path = tmp_path / "prior.json"
    path.write_text(json.dumps(prior))
    result = {**settings, "shapes_done": [], "rows": []}
    synthetic.resume(path, result)
    assert result["shapes_done"] == ["a"] and result["rows"] == [{"shape": "a"}]
    assert result["passes"] == {"a": 1}
    other = {**settings, "rounds": 3, "shapes_done": [], "rows": []}
    synthetic.resume(path, other)
    assert other["shapes_done"] == [] and "rounds differ" in capsys.readouterr().out
