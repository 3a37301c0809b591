"""Steady-state decode throughput of the continuous-batching Engine against a bare loop of batched calls.

For each batch size B (default 8 and 32), on one model (default: RWKV-7 L12-D768, vocabulary 65536,
random weights, with the world tokenizer), it alternates ``--rounds`` times:

(a) bare: the state after prefilling a short prompt (B copies), then ``--tokens`` one-token calls
    ``model(tokens (B, 1), state)``, each followed by one batched ``sample_logits`` with the same settings
    the engine's requests use; tokens/s = B * tokens / time;
(b) engine: B requests with the same prompt and ``max_tokens`` = tokens + B (no stop tokens, so every
    request runs to the end), stepped on this thread; tokens/s counts the tokens generated from the step
    at which every request is decoding (the prefills are done, one per step) to the step at which the
    first request finishes (so every step counted decodes all B rows).

It prints the medians, the ratio engine / bare and the load average. The machine may be shared: the
ratio within one run is what counts, not the absolute numbers.

    python benchmarks/bench_engine.py                       # ~2-3 minutes on 2 cores
    python benchmarks/bench_engine.py --small --batches 8   # a quick look
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from rwkvkit.infer.engine import Engine
from rwkvkit.infer.sampling import SamplingParams, sample_logits
from rwkvkit.models import new_model
from rwkvkit.tokenizer import load_tokenizer


def bare(model, prompt: list[int], batch: int, tokens: int, params: SamplingParams) -> float:
    """Tokens/s of the plain loop: one batched model call and one batched sample per token."""
    with torch.inference_mode():
        x = torch.tensor([prompt] * batch, dtype=torch.long)  # (B, T)
        logits, state = model(x, None)  # logits (B, T, V)
        last = logits[:, -1].float()  # (B, V)
        gen = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        for _ in range(tokens):
            ids = sample_logits(last, params.temperature, params.top_p, params.top_k, gen)  # (B,)
            logits, state = model(ids.view(-1, 1), state)  # logits (B, 1, V)
            last = logits[:, -1].float()
        return batch * tokens / (time.perf_counter() - start)


def engine_run(model, tok, prompt: list[int], batch: int, tokens: int, params: SamplingParams) -> float:
    """Tokens/s of the Engine from the step at which all ``batch`` requests are decoding to the end."""
    engine = Engine(model, tok, max_batch=batch, max_waiting=batch)
    for _ in range(batch):  # one prompt is prefilled per step: the first request decodes that much longer
        engine.submit(prompt, params=params, max_tokens=tokens + batch, stop_tokens=[])
    while len(engine._decoding) < batch:  # one prompt is prefilled per step
        engine.step()
    start, done = time.perf_counter(), engine.counters["generated_tokens"]
    while engine.counters["finished"] == 0:  # every step of this window decodes all B rows
        engine.step()
    rate = (engine.counters["generated_tokens"] - done) / (time.perf_counter() - start)
    engine.run_until_idle()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32], help="batch sizes to measure")
    parser.add_argument("--tokens", type=int, default=48, help="tokens generated per request / row")
    parser.add_argument("--prompt-len", type=int, default=8, help="prompt length in tokens")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved bare / engine rounds")
    parser.add_argument("--small", action="store_true", help="RWKV-7 L4-D256 instead of L12-D768")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0 = greedy)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass for sampling")
    args = parser.parse_args()

    torch.manual_seed(0)
    layers, width = (4, 256) if args.small else (12, 768)
    model = new_model("7", layers, width, 65536).eval()
    tok = load_tokenizer("world")
    prompt = tok.encode("The quick brown fox jumps over the lazy dog. " * 4)[: args.prompt_len]
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p)
    bare(model, prompt, 2, 4, params)  # warm up (builds the native step on first use)

    print(
        f"RWKV-7 L{layers}-D{width} V65536, prompt {len(prompt)}, {args.tokens} tokens, {args.rounds} rounds"
    )
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    print(f"{'batch':>5} {'bare tok/s':>11} {'engine tok/s':>13} {'engine/bare':>12} {'load':>6}")
    for batch in args.batches:
        a, b, ratios = [], [], []
        for _ in range(args.rounds):
            a.append(bare(model, prompt, batch, args.tokens, params))
            b.append(engine_run(model, tok, prompt, batch, args.tokens, params))
            ratios.append(b[-1] / a[-1])
        print(
            f"{batch:>5} {statistics.median(a):>11.1f} {statistics.median(b):>13.1f} "
            f"{statistics.median(ratios):>12.2f} {os.getloadavg()[0]:>6.2f}"
        )


if __name__ == "__main__":
    main()
