"""Repetition loops in a target's replies: where one starts, and what the data keeps.

A small target often ends a greedy reply by repeating one unit until the token limit.
vLLM serves such a reply whole, so by default the data keeps it whole ("keep"); "trim"
cuts it to one copy of the repeating unit. Either way the conversation ends there
(`data.self_distill.converse`), so one generation serves both modes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from coral_vllm.data.generators import Reply

# a reply is called looping when its tail repeats one unit of <= MAX_PERIOD tokens for
# at least LOOP_MIN_TOKENS tokens beyond the first copy (at least three copies in all)
MAX_PERIOD = 256
LOOP_MIN_TOKENS = 16
# what the written data does with a looping reply (see apply_loops)
LOOP_MODES = ("keep", "trim")
DEFAULT_LOOPS = "keep"

Turn = tuple[list[int], bool, int | None]  # reply ids (no end token), ended, loop cut


def loop_start(ids: Sequence[int], max_period: int = MAX_PERIOD,
               min_tokens: int = LOOP_MIN_TOKENS) -> int | None:
    """Length to cut a reply to so one copy of a repeating tail remains, or None.

    A tail is looping with period p when its last L >= max(2p, min_tokens) tokens each
    equal the token p before them (>= 3 copies); the longest such L over p wins.
    """
    x = np.asarray(ids)
    n = len(x)
    if n < min_tokens + 1:
        return None
    periods = np.arange(1, min(max_period, n // 3) + 1)
    if not len(periods):
        return None
    window = min(n, 3 * max_period)
    t = np.arange(n - window, n)
    valid = t[None, :] - periods[:, None] >= 0
    same = (x[t][None, :] == x[np.maximum(t[None, :] - periods[:, None], 0)]) & valid
    # trailing run of equal positions per period
    run = np.argmin(np.concatenate([same[:, ::-1], np.zeros((len(periods), 1), bool)], 1), 1)
    ok = (run >= np.maximum(2 * periods, min_tokens))
    if not ok.any():
        return None
    best = int(np.argmax(np.where(ok, run, -1)))
    return n - int(run[best])



def apply_loops(turns: list[Turn], loops: str, cuts: dict[str, int]) -> list[Reply]:
    """The replies as the data holds them: a looping reply whole ("keep", as vLLM serves
    the target) or cut to one copy of its repeating unit, unended ("trim")."""
    out: list[Reply] = []
    for ids, ended, cut in turns:
        cuts["replies"] += 1
        if cut is not None:
            cuts["replies_looping"] += 1
            cuts["loop_tokens"] += len(ids) - cut
            if loops == "trim":
                ids, ended = ids[:cut], False
        out.append((ids, ended))
    return out
