"""``make demo``: train a small RWKV-7 on the shipped Shakespeare corpus, then run it as an RNN.

1. trains from scratch in parallel ("GPT") mode on data/shakespeare/train.txt (byte tokenizer),
2. reports validation loss on val.txt (held-out Hamlet) against the 1.7 nats/byte target,
3. reloads the written official-layout `.pth` and shows that the RNN mode (one token at a time with a
   carried state) gives the same loss as the parallel mode on a slice of val.txt,
4. generates a sample through the RNN path.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rwkvkit.errors import RwkvkitError

TARGET_VAL_LOSS = 1.7
CORPUS = Path("data") / "shakespeare"


def find_corpus() -> Path:
    """The shipped corpus folder: under the current directory, or next to the rwkvkit package."""
    for base in (Path.cwd(), Path(__file__).resolve().parent.parent):
        if (base / CORPUS / "train.txt").is_file():
            return base / CORPUS
    raise RwkvkitError(f"cannot find {CORPUS}/train.txt; run the demo from the project root")


@torch.inference_mode()
def rnn_vs_parallel_loss(model, tokens: torch.Tensor) -> tuple[float, float]:
    """Loss of ``tokens`` (1, T+1) computed in parallel mode and in RNN mode (one token per call)."""
    x, y = tokens[:, :-1], tokens[:, 1:]
    logits, _ = model(x)
    parallel = F.cross_entropy(logits[0], y[0]).item()
    state, total = None, 0.0
    for t in range(x.shape[1]):
        step_logits, state = model(x[:, t : t + 1], state)
        total += F.cross_entropy(step_logits[0], y[0, t : t + 1], reduction="sum").item()
    return parallel, total / x.shape[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rwkvkit.demo", description=__doc__)
    parser.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    parser.add_argument(
        "--time-budget", type=float, default=170.0, help="training time in seconds (default: 170)"
    )
    parser.add_argument("--steps", type=int, default=2000, help="schedule horizon in steps (default: 2000)")
    parser.add_argument("--rnn-check-tokens", type=int, default=1024, help="val tokens for the RNN check")
    parser.add_argument("--sample-tokens", type=int, default=400, help="bytes to generate (default: 400)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from rwkvkit.infer.generate import generate
    from rwkvkit.models import load_model
    from rwkvkit.tokenizer import load_tokenizer
    from rwkvkit.train.trainer import TrainConfig, train

    try:
        corpus = find_corpus()
        cfg = TrainConfig(
            data=str(corpus / "train.txt"),
            val_data=str(corpus / "val.txt"),
            out=args.out,
            tokenizer="byte",
            n_layer=4,
            n_embd=128,
            head_size=32,
            ctx_len=256,
            batch_size=16,
            steps=args.steps,
            time_budget=args.time_budget,
            lr=2e-3,
            lr_final=1e-4,
            warmup_steps=30,
            weight_decay=0.1,
            progress=not args.no_progress,
        )
        print(
            f"== 1/4 training RWKV-7 from scratch on {cfg.data} for up to {cfg.time_budget:.0f}s", flush=True
        )
        result = train(cfg)
        print(f"   {result.steps} steps, {result.tokens:,} tokens in {result.seconds:.0f}s")

        status = "below" if result.val_loss < TARGET_VAL_LOSS else "ABOVE"
        print(
            f"== 2/4 validation loss on val.txt: {result.val_loss:.4f} nats/byte "
            f"({status} the {TARGET_VAL_LOSS} target)"
        )

        model = load_model(result.model_path)
        tokenizer = load_tokenizer("byte")
        val_text = (corpus / "val.txt").read_text(encoding="utf-8")
        piece = torch.tensor([tokenizer.encode(val_text)[: args.rnn_check_tokens + 1]])
        t0 = time.perf_counter()
        parallel, rnn = rnn_vs_parallel_loss(model, piece)
        seconds = time.perf_counter() - t0
        print(
            f"== 3/4 reloaded {result.model_path}: loss on {piece.shape[1] - 1} val bytes, parallel mode "
            f"{parallel:.5f}, RNN mode {rnn:.5f} (|diff| {abs(parallel - rnn):.1e}, {seconds:.1f}s)"
        )

        prompt = "ROMEO:\n"
        print(f"== 4/4 sample from the .pth through the RNN path (prompt {prompt!r}):\n")
        sys.stdout.write(prompt)
        stream = generate(
            model,
            tokenizer,
            prompt,
            max_tokens=args.sample_tokens,
            temperature=0.8,
            top_p=0.9,
            seed=0,
            stop_tokens=(),
            prefill_chunk=1,
        )
        for text in stream:
            sys.stdout.write(text)
            sys.stdout.flush()
        print("\n")
        return 0 if result.val_loss < TARGET_VAL_LOSS else 1
    except RwkvkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
