"""Token ids of a prompt with the target's replies spliced in as the ids it generated.

Self-distillation (`data.self_distill`) never decodes a reply and tokenizes it again:
the drafter trains on exactly the token sequences the target produced. A chat target's
turns go through its chat template (:class:`ChatSplicer`); a base target's passage is a
plain-text prompt (:class:`TextSplicer`). Both give (ids, loss mask), the mask being 1 on
the generated tokens.
"""

from __future__ import annotations

import re
from typing import Sequence

from coral_vllm.data.generators import Reply
from coral_vllm.data.texts import TextPrompter

SENTINEL = "\x00REPLY{}\x00"
_SENTINEL_RE = re.compile("\x00REPLY\\d+\x00")


class ChatSplicer:
    """Token ids of a chat whose assistant turns are given as generated ids.

    The template is rendered once with a sentinel in place of each reply; the text
    around the sentinels is tokenized piece by piece (special tokens delimit the pieces,
    so this equals tokenizing the whole) and the replies' own ids go in between.
    """

    def __init__(self, tokenizer, eos_ids: Sequence[int]) -> None:
        self.tok = tokenizer
        self.eos = set(int(e) for e in eos_ids)
        # tokenizing is most of the data stage's CPU time: each conversation prefix is
        # asked for once per round and again when the data is written
        self._segments: dict[tuple[str, ...], list[list[int]]] = {}

    def segments(self, turns: Sequence[str]) -> list[list[int]]:
        """len(turns) pieces: piece i precedes reply i + 1; the last ends with the
        generation prompt for turns[-1]."""
        key = tuple(turns)
        if key not in self._segments:
            self._segments[key] = self._render(key)
        return self._segments[key]

    def _render(self, turns: tuple[str, ...]) -> list[list[int]]:
        msgs: list[dict[str, str]] = []
        for i, t in enumerate(turns):
            msgs.append({"role": "user", "content": t})
            if i < len(turns) - 1:
                msgs.append({"role": "assistant", "content": SENTINEL.format(i)})
        text = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        pieces = _SENTINEL_RE.split(text)
        if len(pieces) != len(turns):
            raise ValueError("the chat template does not render assistant turns verbatim; "
                             "multi-turn self-distillation needs it to")
        return list(self.tok(pieces, add_special_tokens=False)["input_ids"])

    def sequence(self, turns: Sequence[str], replies: Sequence[Reply]
                 ) -> tuple[list[int], list[int]]:
        """(ids, loss mask) of turns[0], replies[0], turns[1], ...; with one reply fewer
        than turns it ends with the generation prompt of the last turn. The loss mask is
        1 on the generated tokens, including the end-of-turn token of a reply that ended
        (the template's own token where it follows the reply)."""
        segs = self.segments(turns)
        ids, mask = list(segs[0]), [0] * len(segs[0])
        for i, (reply, ended) in enumerate(replies):
            ids += reply
            mask += [1] * len(reply)
            nxt = segs[i + 1] if i + 1 < len(segs) else []
            if i + 1 < len(segs):
                ids += nxt
                mask += [int(ended and bool(nxt) and nxt[0] in self.eos)] + [0] * (len(nxt) - 1)
            elif ended:
                ids.append(min(self.eos))
                mask.append(1)
        return ids, mask


class TextSplicer:
    """Token ids of a plain-text prompt (:class:`~coral_vllm.data.texts.TextPrompter`)
    followed by the target's continuation, for a base target (no chat template); the same
    interface as ChatSplicer, `turns` holding the one passage."""

    def __init__(self, tokenizer, eos_ids: Sequence[int], prompt_tokens: int) -> None:
        self.prompt = TextPrompter(tokenizer, prompt_tokens)
        self.eos = set(int(e) for e in eos_ids)

    def sequence(self, turns: Sequence[str], replies: Sequence[Reply]
                 ) -> tuple[list[int], list[int]]:
        """(ids, loss mask) of the prompt and, if given, its continuation; the mask is 1
        on the continuation and on the end token of one that ended."""
        if len(turns) != 1 or len(replies) > 1:
            raise ValueError(f"a passage is one prompt with at most one continuation, not "
                             f"{len(turns)} turns and {len(replies)} replies")
        ids = self.prompt(turns[0])
        mask = [0] * len(ids)
        for reply, ended in replies:
            ids += reply
            mask += [1] * len(reply)
            if ended:
                ids.append(min(self.eos))
                mask.append(1)
        return ids, mask
