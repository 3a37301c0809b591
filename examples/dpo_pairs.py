"""Build a small preference set from the shipped Shakespeare corpus for the DPO recipe.

Each record gives two lines of a speech as raw text and asks the model to prefer the line
that really follows over another line of the same play of about the same length (so that the summed
log-probability does not favour the rejected line just for being shorter)::

    {"prefix": "<line>\\n<line>\\n", "chosen": "<the next line>", "rejected": "<a line from elsewhere>"}

written as ``.jsonl`` for ``rwkvkit train --objective dpo``. Usage:
``python examples/dpo_pairs.py [--out DIR] [--seed N]`` -> DIR/dpo_train.jsonl (2,000 pairs from
train.txt) and DIR/dpo_val.jsonl (200 from val.txt, the held-out play).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

CORPUS = Path(__file__).resolve().parent.parent / "data" / "shakespeare"


def is_verse(line: str, min_chars: int) -> bool:
    """A line of a speech: at least ``min_chars`` long and not a speaker's name (upper case)."""
    return len(line) >= min_chars and not line.isupper()


def swapped_words(line: str, rng: random.Random) -> str | None:
    """The line with two neighbouring words (chosen at random among the pairs that differ) swapped;
    None when it has fewer than four words."""
    words = line.split()
    places = [k for k in range(len(words) - 1) if words[k] != words[k + 1]]
    if len(words) < 4 or not places:
        return None
    k = rng.choice(places)
    words[k], words[k + 1] = words[k + 1], words[k]
    return " ".join(words)


def preference_pairs(text: str, rng: random.Random, min_chars: int = 20) -> list[dict]:
    """One pair per three consecutive lines of a speech: the first two are the prefix, the third is
    chosen, and rejected is the same line with two neighbouring words swapped."""
    lines = [line.strip() for line in text.splitlines()]
    records = []
    for i in range(2, len(lines)):
        if not all(is_verse(lines[j], min_chars) for j in (i - 2, i - 1, i)):
            continue
        rejected = swapped_words(lines[i], rng)
        if rejected is None:
            continue
        prefix = f"{lines[i - 2]}\n{lines[i - 1]}\n"
        records.append({"prefix": prefix, "chosen": lines[i], "rejected": rejected})
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/dpo_data", help="output folder (default: %(default)s)")
    parser.add_argument("--train-records", type=int, default=2000, help="training pairs kept (default: 2000)")
    parser.add_argument("--val-records", type=int, default=200, help="held-out pairs kept (default: 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the rejected lines' draw (default: 0)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    train = preference_pairs((CORPUS / "train.txt").read_text(encoding="utf-8"), rng)
    val = preference_pairs((CORPUS / "val.txt").read_text(encoding="utf-8"), rng)
    # a random subset of each: the reference model scores every training pair once at setup
    train = random.Random(args.seed + 1).sample(train, min(args.train_records, len(train)))
    val = random.Random(args.seed + 2).sample(val, min(args.val_records, len(val)))
    for name, records in (("dpo_train.jsonl", train), ("dpo_val.jsonl", val)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        print(f"{out / name}: {len(records)} pairs")


if __name__ == "__main__":
    main()
