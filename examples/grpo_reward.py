"""Rewards and prompts for the GRPO recipe on the demo model (a byte-level RWKV trained on Shakespeare).

The task: after a speaker's name (``GONZALO.\\n``, as the corpus writes them), the first line of the
speech should end with a period.
The reward is checkable from the text alone, so no judge model is needed::

    rwkvkit train --objective grpo --reward examples/grpo_reward.py:ends_with_period ...

``contains_word`` shows a reward that reads an extra field of the prompt record (``{"prefix": ...,
"word": "love"}``). Usage: ``python examples/grpo_reward.py [--out DIR]`` -> DIR/grpo_prompts.jsonl
and DIR/grpo_val.jsonl (every tenth speaker of train.txt, held out), as raw-text ``prefix`` records.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CORPUS = Path(__file__).resolve().parent.parent / "data" / "shakespeare"


def ends_with_period(prompt: str, completion: str, **extra) -> float:
    """1.0 when the completion's first non-empty line ends with '.', else 0.0."""
    lines = [line.strip() for line in completion.splitlines() if line.strip()]
    return float(bool(lines) and lines[0].endswith("."))


def contains_word(prompt: str, completion: str, word: str, **extra) -> float:
    """1.0 when the completion contains the record's ``word`` (case-insensitive), else 0.0."""
    return float(word.lower() in completion.lower())


def speaker_prefixes(text: str) -> list[str]:
    """Each distinct speaker's name as it opens a speech ("NAME.\\n"), in order of first appearance."""
    seen: dict[str, None] = {}
    for line in text.splitlines():
        line = line.strip()
        name = line[:-1]
        words = name.split()
        if line.endswith(".") and name.replace(" ", "").isalpha() and name.isupper() and len(name) > 1:
            if words[0] in ("ACT", "SCENE", "PERSONS", "EPILOGUE", "PROLOGUE"):
                continue
            seen.setdefault(line + "\n", None)
    return list(seen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/grpo_data", help="folder for the two .jsonl files")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    speakers = speaker_prefixes((CORPUS / "train.txt").read_text(encoding="utf-8"))
    splits = {
        "grpo_prompts.jsonl": [p for i, p in enumerate(speakers) if i % 10],
        "grpo_val.jsonl": speakers[::10],
    }
    for name, prefixes in splits.items():
        with open(out / name, "w", encoding="utf-8") as f:
            for prefix in prefixes:
                f.write(json.dumps({"prefix": prefix}) + "\n")
        print(f"{out / name}: {len(prefixes)} prompts")


if __name__ == "__main__":
    main()
