"""`coral-vllm bench load`: its accounting, and a short real run against `vllm serve` on
the CPU (64 streams, some hung up), checked for what the GPU run records."""

from __future__ import annotations

import json

import pytest

from coral_vllm.bench.load import Outcome, Template, error_chain, summarize

FIELDS = {"device", "requests", "concurrency", "failed", "mismatched", "cancelled",
          "duration_s", "p50_ttft_ms", "p99_ttft_ms", "rss_mb_start", "rss_mb_end"}


def test_only_greedy_replies_read_to_the_end_are_compared():
    greedy, sampled = Template("a", 8, 0.0), Template("b", 8, 0.8)
    outcomes = [Outcome(greedy, "x", 0.1, "length"),                # matches plain
                Outcome(greedy, "y", 0.2, "stop"),                  # differs: mismatched
                Outcome(greedy, "", 0.3, None, cancelled=True),     # hung up: not compared
                Outcome(sampled, "z", 0.4, "length"),               # sampled: not compared
                Outcome(greedy, error="ReadTimeout: ..."),          # failed
                Outcome(greedy, "x", 0.5, "abort")]                 # ended oddly: failed
    r = summarize(outcomes, {greedy: "x"})
    assert (r["requests"], r["failed"], r["mismatched"], r["cancelled"], r["compared"]) == \
        (6, 2, 1, 1, 2)
    assert r["mismatches"][0]["coral"] == "y" and r["p50_ttft_ms"] == 300.0


def test_a_failure_is_recorded_with_its_causes():
    """The OpenAI client's connection error names nothing; its httpx cause must show."""
    try:
        try:
            raise ConnectionResetError("peer closed connection")
        except ConnectionResetError as e:
            raise RuntimeError("Connection error.") from e
    except RuntimeError as e:
        msg = error_chain(e)
    assert msg == "RuntimeError: Connection error. <- ConnectionResetError: peer closed connection"


@pytest.mark.engine
def test_load_run_through_vllm_serve(target_dir, tmp_path):
    """45 s of 64 concurrent streams (eager servers: start-up would dominate otherwise):
    nothing fails, every greedy reply equals plain decoding's, hung-up streams are
    aborted by the server, and its memory stays within 10% after the warm-up."""
    from coral_vllm.bench.load import main

    out = tmp_path / "load.json"
    rc = main(["--model", str(target_dir), "--duration-s", "45", "--concurrency", "64",
               "--prompts", "24", "--max-tokens", "8", "24", "64", "--enforce-eager",
               "--out", str(out)])
    r = json.loads(out.read_text())
    assert FIELDS <= set(r)
    assert r["failed"] == 0, r["failures"]
    assert r["mismatched"] == 0, r["mismatches"]
    assert r["cancelled"] > 0 and r["compared"] > 0 and r["requests"] > r["concurrency"]
    assert r["server_after"] == {"running": 0.0, "waiting": 0.0}
    assert r["rss_mb_end"] <= 1.1 * r["rss_mb_start"], r["rss_mb_series"]
    assert r["spec_decode"]["num_drafts"] > 0 and rc == 0
