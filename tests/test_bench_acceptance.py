"""`bench acceptance`: tau at every k <= the served k from one run's counters."""

from __future__ import annotations

import pytest

from coral_vllm.bench.acceptance import tau_by_k
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
