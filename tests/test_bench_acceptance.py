"""`bench acceptance`: tau at every k <= the served k from one run's counters, and the
same counters whether the drafters' engines run one at a time or side by side."""

from __future__ import annotations

from pathlib import Path

import pytest

from coral_vllm.bench.acceptance import measure_all, tau_by_k
from coral_vllm.data.eval_sets import chat_prompt_ids
from coral_vllm.model_store.drafters import shipped_drafter
from engine_utils import engines_in_process
from coral_vllm.runtime.metrics import SpecDecodeStats


def test_tau_by_k_cuts_the_chain_and_ends_at_the_runs_tau():
    """10 drafts of k=3: 6 accepted their 1st token, 3 their first 2, 1 all 3. Drafting
    only j tokens would have accepted min(L, j) of each: tau(1) = 1.6, tau(2) = 1.9,
    tau(3) = 2.0 = the run's own 1 + accepted / drafts."""
    st = SpecDecodeStats(num_drafts=10, num_draft_tokens=30, num_accepted_tokens=10,
                         accepted_per_position=[6, 3, 1])
    got = tau_by_k(st.per_position_rate)
    assert got == {1: pytest.approx(1.6), 2: pytest.approx(1.9), 3: pytest.approx(2.0)}
    assert got[3] == pytest.approx(st.acceptance_length)
    assert tau_by_k([]) == {}


@pytest.mark.engine
def test_side_by_side_engines_count_what_one_at_a_time_counts(target_dir: Path,
                                                               random_drafter: Path) -> None:
    """Two drafters (the shipped one, an untrained one) measured one at a time in this
    process and then side by side in two spawned processes: the same counters, drafter by
    drafter (float32, greedy, the same prompts: nothing depends on the engines' order)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(target_dir))
    prompts = {"smoke": [chat_prompt_ids(tok, q)
                         for q in ("Name three colours.", "What is 12 times 7?")]}
    drafters = {"shipped": shipped_drafter(), "untrained": random_drafter}
    args = (target_dir, drafters, 3, prompts, 24)
    with engines_in_process():  # each engine's core in its process (spawned ones inherit it)
        alone = measure_all(*args, engines=1, enforce_eager=True)
        together = measure_all(*args, engines=2, enforce_eager=True)
    assert together == alone
    assert alone["shipped"]["smoke"].num_drafts > 0
    assert alone["shipped"]["smoke"].num_accepted_tokens > alone["untrained"]["smoke"].num_accepted_tokens


@pytest.mark.engine
def test_side_by_side_names_the_drafter_whose_engine_failed(target_dir: Path,
                                                            tmp_path: Path) -> None:
    with engines_in_process(), pytest.raises(RuntimeError, match="drafter missing: "):
        measure_all(target_dir, {"missing": tmp_path / "none"}, 3, {"smoke": [[1, 2, 3]]}, 4,
                    engines=2, enforce_eager=True)
