"""Build a small instruction set from the shipped Shakespeare corpus for the chat SFT recipe.

Each record asks for the line that follows a line of the play::

    {"prompt": "Next line after: <a line>", "completion": "<the line after it>"}

written as ``.jsonl`` for ``rwkvkit train`` / ``rwkvkit eval`` (only the completion carries loss).
Usage: ``python examples/sft_pairs.py [--out DIR]`` -> DIR/sft_train.jsonl and DIR/sft_val.jsonl
(train.txt and val.txt, so the held-out records come from the held-out play).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CORPUS = Path(__file__).resolve().parent.parent / "data" / "shakespeare"


def line_pairs(text: str, min_chars: int = 20) -> list[dict[str, str]]:
    """Consecutive pairs of verse lines (both at least ``min_chars`` long, neither a speaker's name)."""
    lines = [line.strip() for line in text.splitlines()]
    records = []
    for first, second in zip(lines[:-1], lines[1:], strict=True):
        if len(first) >= min_chars and len(second) >= min_chars and not second.isupper():
            records.append({"prompt": f"Next line after: {first}", "completion": second})
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/sft_data", help="output folder (default: %(default)s)")
    parser.add_argument("--val-records", type=int, default=400, help="held-out records kept (default: 400)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, records in (
        ("sft_train.jsonl", line_pairs((CORPUS / "train.txt").read_text(encoding="utf-8"))),
        ("sft_val.jsonl", line_pairs((CORPUS / "val.txt").read_text(encoding="utf-8"))[: args.val_records]),
    ):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        print(f"{out / name}: {len(records)} records")


if __name__ == "__main__":
    main()
