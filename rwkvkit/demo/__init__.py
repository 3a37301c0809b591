"""``make demo`` (``python -m rwkvkit.demo``): train a small RWKV-7 on the shipped Shakespeare corpus, then
run it as an RNN.

1. trains from scratch in parallel ("GPT") mode on data/shakespeare/train.txt (byte tokenizer),
2. reports validation loss on val.txt (held-out Hamlet) against the 1.7 nats/byte target,
3. reloads the written official-layout `.pth` and shows that the RNN mode (one token at a time with a
   carried state) gives the same loss as the parallel mode on a slice of val.txt,
4. generates a sample through the RNN path.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rwkvkit.errors import RwkvkitError
from rwkvkit.infer.generate import generate
from rwkvkit.models import load_model
from rwkvkit.tokenizer import load_tokenizer
from rwkvkit.train.trainer import TrainConfig, train

TARGET_VAL_LOSS = 1.7
CORPUS = Path("data") / "shakespeare"


def find_corpus() -> Path:
    """The shipped corpus folder: under the current directory, or next to the rwkvkit package."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
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


def run_demo(
    out: str = "runs/demo",
    time_budget: float = 270.0,
    steps: int = 2000,
    rnn_check_tokens: int = 1024,
    sample_tokens: int = 400,
    progress: bool = True,
) -> int:
    """Run the four parts of the demo, printing as it goes. Returns 0 when the validation loss is below
    TARGET_VAL_LOSS, else 1."""
    corpus = find_corpus()
    cfg = TrainConfig(
        data=str(corpus / "train.txt"),
        val_data=str(corpus / "val.txt"),
        out=out,
        tokenizer="byte",
        n_layer=4,
        n_embd=128,
        head_size=32,
        ctx_len=256,
        batch_size=16,
        steps=steps,
        time_budget=time_budget,
        lr=2e-3,
        lr_final=1e-4,
        warmup_steps=30,
        weight_decay=0.1,
        progress=progress,
    )
    print(f"== 1/4 training RWKV-7 from scratch on {cfg.data} for up to {cfg.time_budget:.0f}s", flush=True)
    result = train(cfg)
    print(f"   {result.steps} steps, {result.tokens:,} tokens in {result.seconds:.0f}s")
    status = "below" if result.val_loss < TARGET_VAL_LOSS else "ABOVE"
    print(
        f"== 2/4 validation loss on val.txt: {result.val_loss:.4f} nats/byte "
        f"({status} the {TARGET_VAL_LOSS} target)"
    )
    model = load_model(result.model_path)
    tokenizer = load_tokenizer("byte")
    _check_rnn_mode(model, tokenizer, corpus / "val.txt", rnn_check_tokens, result.model_path)
    _sample(model, tokenizer, sample_tokens)
    return 0 if result.val_loss < TARGET_VAL_LOSS else 1


def _check_rnn_mode(model, tokenizer, val_path: Path, n_tokens: int, model_path) -> None:
    """Part 3: the reloaded model's loss on ``n_tokens`` of val.txt in parallel mode and in RNN mode."""
    val_text = val_path.read_text(encoding="utf-8")
    piece = torch.tensor([tokenizer.encode(val_text)[: n_tokens + 1]])  # (1, T+1)
    t0 = time.perf_counter()
    parallel, rnn = rnn_vs_parallel_loss(model, piece)
    seconds = time.perf_counter() - t0
    print(
        f"== 3/4 reloaded {model_path}: loss on {piece.shape[1] - 1} val bytes, parallel mode "
        f"{parallel:.5f}, RNN mode {rnn:.5f} (|diff| {abs(parallel - rnn):.1e}, {seconds:.1f}s)"
    )


def _sample(model, tokenizer, n_tokens: int) -> None:
    """Part 4: a sample of ``n_tokens`` bytes through the RNN path, streamed to stdout."""
    prompt = "ROMEO:\n"
    print(f"== 4/4 sample from the .pth through the RNN path (prompt {prompt!r}):\n")
    sys.stdout.write(prompt)
    stream = generate(
        model,
        tokenizer,
        prompt,
        max_tokens=n_tokens,
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
