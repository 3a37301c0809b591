"""Cut the shipped Shakespeare corpus into documents for the packed-training recipe (``--pack``).

Each paragraph of the plays (a speech, a stage direction, a heading: the text between blank lines) is
one document, ``{"text": ...}`` per line of a ``.jsonl``, which ``rwkvkit data`` writes with the
end-of-text id 0 after each. Usage: ``python examples/pack_docs.py [--out DIR]`` -> DIR/docs_train.jsonl
and DIR/docs_val.jsonl (from train.txt and val.txt).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CORPUS = Path(__file__).resolve().parent.parent / "data" / "shakespeare"


def paragraphs(text: str) -> list[str]:
    """The non-empty paragraphs of ``text`` (split at blank lines), stripped."""
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/pack_data", help="output folder (default: %(default)s)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, source in (("docs_train.jsonl", "train.txt"), ("docs_val.jsonl", "val.txt")):
        docs = paragraphs((CORPUS / source).read_text(encoding="utf-8"))
        with open(out / name, "w", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
        print(f"{out / name}: {len(docs)} documents, {sum(map(len, docs)) / len(docs):.0f} characters each")


if __name__ == "__main__":
    main()
