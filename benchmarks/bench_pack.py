"""Benchmark packed-document training (``--pack``) against unpacked rows on the demo model (not a test).

The same batches (16 windows of 256 bytes from the shipped corpus cut into documents, each followed by
the end-of-text id 0 as ``rwkvkit data`` writes them) train one optimizer step at a time, alternately
with the document restarts (``resets``, the variable-length WKV) and without (the plain chunked WKV),
so the machine's drift hits both alike; the table gives the median tokens/s of each and their ratio,
for short documents (the corpus's paragraphs, median ~56 bytes) and longer ones (10 paragraphs each).

    python benchmarks/bench_pack.py              # the table in benchmarks/RESULTS.md
    python benchmarks/bench_pack.py --reps 10    # quicker
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from rwkvkit.models import new_model
from rwkvkit.train.data import EOT_ID, sample_batch
from rwkvkit.train.optim import L2Wrap, make_optimizer
from rwkvkit.train.trainer import compute_loss, pack_resets

CORPUS = Path(__file__).resolve().parent.parent / "data" / "shakespeare" / "train.txt"


def documents_stream(paragraphs_per_doc: int) -> tuple[np.ndarray, float]:
    """The corpus as byte tokens, cut into documents of this many paragraphs, each followed by id 0;
    and the mean document length in tokens."""
    paragraphs = [p for p in CORPUS.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    docs = [
        "\n\n".join(paragraphs[i : i + paragraphs_per_doc])
        for i in range(0, len(paragraphs), paragraphs_per_doc)
    ]
    pieces = [np.frombuffer(d.encode("utf-8"), dtype=np.uint8).astype(np.int64) for d in docs]
    eot = np.array([EOT_ID], dtype=np.int64)
    stream = np.concatenate([x for p in pieces for x in (p, eot)])
    return stream, stream.size / len(docs)


def train_step(model, optimizer, x: torch.Tensor, y: torch.Tensor, resets: torch.Tensor | None) -> float:
    """One optimizer step as the trainer takes it (CE + L2Wrap, backward, clip, AdamW); its seconds."""
    t0 = time.perf_counter()
    logits, _ = model(x, resets=resets)
    loss = compute_loss(logits, y)
    L2Wrap.apply(loss, logits).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def measure(stream: np.ndarray, reps: int, batch: int, ctx: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = new_model("7", 4, 128, 256, 32, torch.device("cpu")).train()
    optimizer = make_optimizer(model, 1e-4, 0.1)
    times: dict[str, list[float]] = {"packed": [], "unpacked": []}
    starts = []
    for rep in range(reps + 2):  # the first two of each are warm-up
        x, y = sample_batch(stream, rep, batch, ctx, seed=0)
        starts.append(pack_resets(x).sum().item() / batch)
        order = ("packed", "unpacked") if rep % 2 == 0 else ("unpacked", "packed")
        for form in order:
            seconds = train_step(model, optimizer, x, y, pack_resets(x) if form == "packed" else None)
            if rep >= 2:
                times[form].append(seconds)
    tokens = batch * ctx
    packed = tokens / statistics.median(times["packed"])
    unpacked = tokens / statistics.median(times["unpacked"])
    return {
        "packed": packed,
        "unpacked": unpacked,
        "ratio": packed / unpacked,
        "docs_per_row": statistics.mean(starts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=20, help="timed steps of each form per document size")
    parser.add_argument("--batch", type=int, default=16, help="windows per step (the demo's 16)")
    parser.add_argument("--ctx", type=int, default=256, help="window length in bytes (the demo's 256)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}")
    print(
        f"demo model RWKV-7 L4-D128, batch {args.batch} x ctx {args.ctx}, median of {args.reps} steps each\n"
    )
    print(
        f"{'documents':<28} {'mean len':>9} {'starts/row':>10} {'unpacked tok/s':>15} "
        f"{'packed tok/s':>13} {'ratio':>6}"
    )
    for name, per_doc in (("paragraphs (short)", 1), ("10 paragraphs (longer)", 10)):
        stream, mean_len = documents_stream(per_doc)
        r = measure(stream, args.reps, args.batch, args.ctx)
        print(
            f"{name:<28} {mean_len:>9.0f} {r['docs_per_row']:>10.1f} {r['unpacked']:>15,.0f} "
            f"{r['packed']:>13,.0f} {r['ratio']:>6.3f}"
        )
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
