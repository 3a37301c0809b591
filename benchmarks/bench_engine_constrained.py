"""What one grammar-constrained (JSON schema) or log-probability request costs a batch of plain ones.

The Engine decodes B requests in one batched step. This measures the median time of one decode step
while all B rows decode, for: (a) B plain requests, (b) B - 1 plain + 1 under a JSON schema
(rwkvkit.infer.constrained: a token mask per step for that row only), (c) B - 1 plain + 1 recording
log-probabilities (top 5). Plain rows are sampled in one batched call; a constrained or scored row is
sampled on its own, so the question is how much a step of the whole batch slows. Variants alternate for
``--rounds`` rounds; medians and the ratios to (a) are printed with the load average.

    python benchmarks/bench_engine_constrained.py            # ~1 minute on 2 cores
    python benchmarks/bench_engine_constrained.py --batch 16 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from rwkvkit.infer.constrained import compile_json_constraint
from rwkvkit.infer.engine import Engine
from rwkvkit.infer.sampling import SamplingParams
from rwkvkit.models import new_model
from rwkvkit.tokenizer import load_tokenizer

SCHEMA = {  # long enough that the constrained row is still decoding after --steps steps
    "type": "object",
    "properties": {"values": {"type": "array", "items": {"type": "integer"}, "minItems": 400}},
    "required": ["values"],
}


def step_times(model, tok, batch: int, steps: int, kind: str, grammar) -> list[float]:
    """The times of ``steps`` decode steps with all ``batch`` rows decoding."""
    engine = Engine(model, tok, max_batch=batch, max_waiting=batch)
    prompt = tok.encode("User: list some numbers\n\nAssistant:")
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1)
    for i in range(batch):
        special = i == 0 and kind != "plain"
        engine.submit_group(
            prompt,
            [params],
            max_tokens=10_000,
            stop_tokens=[],
            top_logprobs=5 if special and kind == "logprobs" else None,
            constraint=grammar.new_matcher if special and kind == "json" else None,
        )
    while len(engine._decoding) < batch:  # one prompt is prefilled per step
        engine.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
        if len(engine._decoding) < batch:
            raise SystemExit(f"a row finished early ({kind}): raise the schema's minItems or lower --steps")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=8, help="requests decoding together (default 8)")
    parser.add_argument("--steps", type=int, default=40, help="decode steps timed per variant and round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the three variants")
    parser.add_argument("--layers", type=int, default=6, help="model depth (random RWKV-7, width 512)")
    args = parser.parse_args()
    torch.manual_seed(0)
    tok = load_tokenizer("world")
    model = new_model("7", n_layer=args.layers, n_embd=512, vocab_size=65536).eval()
    grammar = compile_json_constraint(tok, SCHEMA, vocab_size=65536)
    print(
        f"load average at start: {os.getloadavg()[0]:.2f}; B={args.batch}, RWKV-7 L{args.layers}-D512, "
        "V=65536"
    )
    results: dict[str, list[float]] = {"plain": [], "json": [], "logprobs": []}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for kind in results:
                results[kind] += step_times(model, tok, args.batch, args.steps, kind, grammar)
    base = statistics.median(results["plain"])
    print("| batch | median step (ms) | vs all plain |")
    print("|---|---|---|")
    b = args.batch
    names = {
        "plain": f"{b} plain",
        "json": f"{b - 1} plain + 1 JSON schema",
        "logprobs": f"{b - 1} plain + 1 logprobs (top 5)",
    }
    for kind, times in results.items():
        median = statistics.median(times)
        print(f"| {names[kind]} | {median * 1e3:.2f} | {median / base:.2f}x |")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
