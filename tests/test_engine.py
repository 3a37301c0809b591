"""The continuous-batching engine and the request-level sampling settings.

References: ``generate_text`` (one sequence at a time, the plain loop) for the text and the final state,
hand-computed penalties following the reference package's occurrence/alpha_decay rule, and counts of
what the engine did in each step.
"""

from __future__ import annotations

import threading

import pytest
import torch
from checkpoints import random_state_dict

from rwkvkit import RwkvkitError
from rwkvkit.infer import generate_text
from rwkvkit.infer.decoding import SequenceDecoder, sample_rows
from rwkvkit.infer.engine import Engine, EngineFull, FinishEvent, TextEvent
from rwkvkit.infer.sampling import SamplingParams, TokenPenalty, adjust_logits, candidate_mask
from rwkvkit.models import model_from_state_dict
from rwkvkit.tokenizer import load_tokenizer

PROMPTS = ["Hello there", "To be, or not to be", "A", "Once upon a time in a land far away, " * 6, "xyz"]


@pytest.fixture(scope="module", params=["7", "6", "4"])
def model(request):
    return model_from_state_dict(
        random_state_dict(request.param, n_layer=2, n_embd=64, vocab_size=256, seed=1)
    )


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("byte")


class Collector:
    """on_event callback that keeps the pieces and the finish event of one request."""

    def __init__(self):
        self.pieces: list[str] = []
        self.finish: FinishEvent | None = None

    def __call__(self, event):
        if isinstance(event, TextEvent):
            assert self.finish is None, "text after the finish event"
            self.pieces.append(event.text)
        else:
            assert self.finish is None, "two finish events"
            self.finish = event


def run(engine: Engine, tok, prompts, **kwargs) -> list[Collector]:
    out = []
    for prompt in prompts:
        c = Collector()
        engine.submit(tok.encode(prompt), on_event=c, **kwargs)
        out.append(c)
    engine.run_until_idle()
    return out


def test_greedy_text_is_the_same_alone_in_a_batch_and_through_generate(model, tok):
    expected = [generate_text(model, tok, p, max_tokens=24, temperature=0, stop_tokens=()) for p in PROMPTS]
    greedy = dict(params=SamplingParams(temperature=0), max_tokens=24, stop_tokens=())
    # 5 requests through 2 slots: they join and leave; prompts longer than the chunk are prefilled in pieces
    batched = run(Engine(model, tok, max_batch=2, prefill_chunk=16), tok, PROMPTS, **greedy)
    for exp, got in zip(expected, batched, strict=True):
        assert got.finish.reason == "length" and "".join(got.pieces) == got.finish.text == exp.text
        assert got.finish.tokens == exp.tokens and got.finish.prompt_tokens == exp.prompt_tokens
        # the final state has consumed the prompt and every generated token, as generate's does
        assert torch.allclose(got.finish.state.wkv, exp.state.wkv, atol=1e-4)
    alone = [run(Engine(model, tok, max_batch=1), tok, [p], **greedy)[0] for p in PROMPTS[:2]]
    assert [c.finish.text for c in alone] == [c.finish.text for c in batched[:2]]


def test_a_seed_gives_the_same_sample_whatever_runs_beside_it(model, tok):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=123)
    alone = run(Engine(model, tok), tok, ["Seeded"], params=params, max_tokens=30, stop_tokens=())
    crowd = run(
        Engine(model, tok, max_batch=4),
        tok,
        ["noise one", "Seeded", "noise two", "noise three"],
        params=SamplingParams(temperature=1.0, top_p=0.9, seed=123),
        max_tokens=30,
        stop_tokens=(),
    )
    assert crowd[1].finish.text == alone[0].finish.text
    ref = generate_text(
        model, tok, "Seeded", max_tokens=30, temperature=1.0, top_p=0.9, seed=123, stop_tokens=()
    )
    assert alone[0].finish.text == ref.text


def test_stop_strings_across_tokens_are_never_emitted(model, tok):
    full = generate_text(model, tok, "Stop here", max_tokens=40, temperature=0, stop_tokens=()).text
    stop = full[5:9]  # four bytes = four tokens with the byte tokenizer
    expected = generate_text(
        model, tok, "Stop here", max_tokens=40, temperature=0, stop_tokens=(), stop_strings=[stop]
    )
    (got,) = run(Engine(model, tok), tok, ["Stop here"], params=SamplingParams(temperature=0), max_tokens=40,
                 stop_tokens=(), stop_strings=[stop])  # fmt: skip
    assert got.finish.reason == "stop" and got.finish.stop == stop
    assert "".join(got.pieces) == got.finish.text == expected.text == full[: full.index(stop)]
    assert stop not in "".join(got.pieces)


def test_stop_tokens_and_max_tokens(model, tok):
    first = generate_text(model, tok, "abc", max_tokens=1, temperature=0, stop_tokens=()).tokens[0]
    (stopped,) = run(
        Engine(model, tok), tok, ["abc"], params=SamplingParams(temperature=0), stop_tokens=(first,)
    )
    assert stopped.finish.reason == "stop" and stopped.finish.stop == first and stopped.finish.tokens == []
    (none,) = run(Engine(model, tok), tok, ["abc"], max_tokens=0)
    assert none.finish.reason == "length" and none.finish.completion_tokens == 0 and none.pieces == []


def test_prefill_of_a_long_prompt_does_not_stall_running_sequences(model, tok):
    engine = Engine(model, tok, max_batch=4, prefill_chunk=8)
    runner = engine.submit(
        tok.encode("running"), SamplingParams(temperature=0), max_tokens=100, stop_tokens=()
    )
    engine.step()  # its prompt is read in the first step
    engine.step()
    long_prompt = tok.encode("a long prompt " * 8)  # 112 tokens = 14 chunks of 8
    late = Collector()
    engine.submit(long_prompt, SamplingParams(temperature=0), max_tokens=5, stop_tokens=(), on_event=late)
    before = len(runner.generated)
    steps = 0
    while late.finish is None:
        engine.step()
        steps += 1
    assert steps >= 14  # one chunk per step
    assert len(runner.generated) - before == steps  # the running sequence got a token in every step
    engine.run_until_idle()


def test_cancel_frees_the_slot_and_leaves_the_others_alone(model, tok):
    engine = Engine(model, tok, max_batch=2)
    greedy = SamplingParams(temperature=0)
    keep, drop = Collector(), Collector()
    engine.submit(tok.encode("keep me"), greedy, max_tokens=20, stop_tokens=(), on_event=keep)
    victim = engine.submit(tok.encode("drop me"), greedy, max_tokens=1000, stop_tokens=(), on_event=drop)
    for _ in range(3):
        engine.step()
    engine.cancel(victim)
    third = Collector()
    engine.submit(tok.encode("next"), greedy, max_tokens=5, stop_tokens=(), on_event=third)
    engine.step()
    assert drop.finish is not None and drop.finish.reason == "cancelled"
    assert engine.stats()["running"] == 2  # the freed slot went to the next request at once
    engine.run_until_idle()
    assert (
        keep.finish.text
        == generate_text(model, tok, "keep me", max_tokens=20, temperature=0, stop_tokens=()).text
    )
    assert third.finish.reason == "length"


def test_a_full_queue_is_refused(model, tok):
    engine = Engine(model, tok, max_batch=1, max_waiting=1)
    engine.submit([1, 2], max_tokens=5)
    engine.step()  # running
    engine.submit([3, 4], max_tokens=5)  # waiting
    with pytest.raises(EngineFull, match="busy"):
        engine.submit([5, 6], max_tokens=5)
    assert engine.stats()["rejected"] == 1
    engine.run_until_idle()


def test_bad_requests_are_refused_before_queueing(model, tok):
    engine = Engine(model, tok)
    for kwargs, match in [
        (dict(prompt=[]), "empty prompt"),
        (dict(prompt=[256]), "outside the vocabulary"),
        (dict(prompt=[1], params=SamplingParams(temperature=-1)), "temperature"),
        (dict(prompt=[1], params=SamplingParams(top_p=0)), "top_p"),
        (dict(prompt=[1], params=SamplingParams(presence_penalty=3)), "presence_penalty"),
        (dict(prompt=[1], params=SamplingParams(logit_bias={999: 1.0})), "logit_bias"),
        (dict(prompt=[1], params=SamplingParams(logit_bias={3: 1000.0})), "logit_bias"),
        (dict(prompt=[1], params=SamplingParams(banned_tokens=[-1])), "banned_tokens"),
        (dict(prompt=[1], max_tokens=-1), "max_tokens"),
        (dict(prompt=[1], stop_strings=[""]), "stop strings"),
    ]:
        with pytest.raises(RwkvkitError, match=match):
            engine.submit(**kwargs)
    assert not engine.has_work()


def test_background_thread_serves_requests_from_several_threads(model, tok):
    engine = Engine(model, tok, max_batch=3)
    engine.start()
    try:
        done = {}

        def client(i: int) -> None:
            finished = threading.Event()
            c = Collector()

            def on_event(event):
                c(event)
                if isinstance(event, FinishEvent):
                    finished.set()

            greedy = SamplingParams(temperature=0)
            engine.submit(tok.encode(PROMPTS[i]), greedy, max_tokens=10, stop_tokens=(), on_event=on_event)
            assert finished.wait(60)
            done[i] = c.finish.text

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        for i, prompt in enumerate(PROMPTS):
            assert (
                done[i]
                == generate_text(model, tok, prompt, max_tokens=10, temperature=0, stop_tokens=()).text
            )
    finally:
        engine.shutdown()


# ---------------------------------------------------------------------------------------------- sampling


def test_penalties_follow_the_reference_rule():
    """occurrence[t] *= decay for every seen t, then occurrence[new] += 1;
    logit[t] -= presence + count[t] * frequency for every seen t."""
    V = 10
    penalty = TokenPenalty(V)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, penalty_decay=0.9)
    occurrence: dict[int, float] = {}
    for token in [3, 3, 7, 3, 1]:
        for t in occurrence:
            occurrence[t] *= 0.9
        occurrence[token] = occurrence.get(token, 0.0) + 1.0
        penalty.update(token, 0.9)
    logits = torch.linspace(-1, 1, V)
    expected = logits.clone()
    for t, count in occurrence.items():
        expected[t] -= 0.5 + count * 0.25
    assert torch.allclose(adjust_logits(logits, params, penalty), expected, atol=1e-6)


def test_logit_bias_and_banned_tokens(model, tok):
    first = generate_text(model, tok, "bias", max_tokens=1, temperature=0, stop_tokens=()).tokens[0]
    forced = 65 if first != 65 else 66
    biased = SamplingParams(temperature=0, logit_bias={forced: 100.0})
    (c,) = run(Engine(model, tok), tok, ["bias"], params=biased, max_tokens=5, stop_tokens=())
    assert c.finish.tokens == [forced] * 5
    banned = SamplingParams(temperature=0, logit_bias={forced: 100.0}, banned_tokens=[forced, first])
    (c,) = run(Engine(model, tok), tok, ["bias"], params=banned, max_tokens=30, stop_tokens=())
    assert forced not in c.finish.tokens and first not in c.finish.tokens and len(c.finish.tokens) == 30


def test_min_p_keeps_tokens_at_least_that_fraction_of_the_best():
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]])
    keep = candidate_mask(probs.log(), min_p=0.15)  # 0.15 * 0.5 = 0.075: the first three
    assert keep.tolist() == [[True, True, True, False, False]]
    assert candidate_mask(probs.log(), min_p=0.0).all()


def test_a_cached_prefix_is_not_prefilled_again(model, tok):
    """With a prefix cache, a prompt extending an earlier one runs only its new tokens through the model,
    and the text is the same as without the cache."""
    from rwkvkit.infer.cache import PrefixCache

    fed = []
    hook = model.register_forward_pre_hook(lambda module, args: fed.append(args[0].shape[1]))
    try:
        engine = Engine(model, tok, prefill_chunk=8, cache=PrefixCache(max_bytes=50_000_000, block_size=8))
        greedy = dict(params=SamplingParams(temperature=0), max_tokens=6, stop_tokens=())
        base = "The system prompt that every request shares. "
        run(engine, tok, [base], **greedy)
        fed.clear()
        (got,) = run(engine, tok, [base + "A question?"], **greedy)
    finally:
        hook.remove()
    n_base, n_new = len(tok.encode(base)), len(tok.encode("A question?"))
    assert got.finish.cached_tokens == n_base
    # tokens through the model: only the new prompt tokens, then one per generated token
    assert sum(fed) == n_new + got.finish.completion_tokens
    expected = generate_text(model, tok, base + "A question?", max_tokens=6, temperature=0, stop_tokens=())
    assert got.finish.text == expected.text
    assert engine.stats()["prefix_cache"]["hits"] >= 1


def test_a_request_that_cannot_sample_fails_alone(model, tok):
    """Banning every token is an error for that request only; the others run on."""
    engine = Engine(model, tok, max_batch=2)
    ok, bad = Collector(), Collector()
    engine.submit(
        tok.encode("fine"), SamplingParams(temperature=0), max_tokens=8, stop_tokens=(), on_event=ok
    )
    engine.submit(tok.encode("doomed"), SamplingParams(banned_tokens=list(range(256))), on_event=bad)
    engine.run_until_idle()
    assert bad.finish.reason == "error" and "every token" in bad.finish.error
    assert ok.finish.reason == "length" and len(ok.finish.tokens) == 8
    assert engine.stats()["failed"] == 1


def test_mixed_settings_in_one_batch_each_match_generate_alone(model, tok):
    """Rows are sampled in batches (groups of the same settings share one softmax / filter); every request
    still gets exactly the tokens it gets alone through generate: seeded groups with different seeds,
    greedy rows, a top-k / min-p group, a penalised and a biased row (sampled on their own), with
    different max_tokens so that rows leave mid-batch and waiting requests join (3 slots, 9 requests)."""
    cases = [
        (SamplingParams(temperature=1.0, seed=1), 12),
        (SamplingParams(temperature=1.0, seed=2), 20),
        (SamplingParams(temperature=0), 9),
        (SamplingParams(temperature=1.0, seed=3), 16),
        (SamplingParams(temperature=0.7, top_k=5, min_p=0.05, seed=4), 14),
        (SamplingParams(temperature=0.7, top_k=5, min_p=0.05, seed=5), 11),
        (SamplingParams(temperature=1.0, presence_penalty=0.5, frequency_penalty=0.3, seed=6), 13),
        (SamplingParams(temperature=1.0, logit_bias={65: 5.0}, seed=7), 10),
        (SamplingParams(temperature=0), 18),
    ]
    engine = Engine(model, tok, max_batch=3)
    got = []
    for i, (params, n) in enumerate(cases):
        c = Collector()
        engine.submit(tok.encode(PROMPTS[i % len(PROMPTS)]), params, max_tokens=n, stop_tokens=(), on_event=c)
        got.append(c)
    engine.run_until_idle()
    for i, ((params, n), c) in enumerate(zip(cases, got, strict=True)):
        ref = generate_text(
            model, tok, PROMPTS[i % len(PROMPTS)], max_tokens=n, sampling=params, stop_tokens=()
        )
        assert c.finish.reason == "length" and c.finish.tokens == ref.tokens, i
        assert "".join(c.pieces) == c.finish.text == ref.text


def test_sample_rows_equals_each_decoder_alone():
    """sample_rows over a batch (seeded, unseeded and greedy rows, two filter settings) gives each seeded
    or greedy row the token its decoder's own sample() gives from a fresh generator with the same seed."""
    bytes_tok = load_tokenizer("byte")
    logits = torch.randn(6, 256, generator=torch.Generator().manual_seed(0)) * 2  # (B, V)
    settings = [
        SamplingParams(temperature=1.0, seed=10),
        SamplingParams(temperature=1.0, seed=11),
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.8, top_p=0.7, seed=12),
        SamplingParams(temperature=0.8, top_p=0.7, seed=13),
        SamplingParams(temperature=1.0),  # unseeded: any token with a nonzero probability
    ]

    def decoders():
        return [SequenceDecoder(bytes_tok, p, vocab_size=256, max_tokens=5) for p in settings]

    batched = sample_rows(decoders(), logits)
    alone = [d.sample(logits[i]) for i, d in enumerate(decoders())]
    assert batched[:5] == alone[:5]
    assert 0 <= batched[5] < 256


def test_sample_rows_fails_only_the_row_with_unusable_logits():
    """A NaN row in a group of rows with the same settings fails alone; the other rows still sample as
    their decoders alone do."""
    bytes_tok = load_tokenizer("byte")
    logits = torch.randn(3, 256, generator=torch.Generator().manual_seed(1))  # (B, V)
    logits[1, 7] = float("nan")

    def decoders():
        return [
            SequenceDecoder(bytes_tok, SamplingParams(seed=s), vocab_size=256, max_tokens=5)
            for s in (1, 2, 3)
        ]

    batched = sample_rows(decoders(), logits)
    assert isinstance(batched[1], RwkvkitError)
    fresh = decoders()
    assert [batched[0], batched[2]] == [fresh[0].sample(logits[0]), fresh[2].sample(logits[2])]
