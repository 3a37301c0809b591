"""The per-sequence decode core (SequenceDecoder) on its own, and the prefill spans the engine and the
prefix cache share.

References: the byte tokenizer makes one token one byte, so each step's text is worked out by hand from
the bytes; penalties are checked against the reference package's occurrence / alpha_decay rule written
out here; spans are listed by hand.
"""

from __future__ import annotations

import pytest
import torch

from rwkvkit.errors import RwkvkitError, check_int
from rwkvkit.infer.decoding import DecodeStep, SequenceDecoder
from rwkvkit.infer.generate import prefill_spans
from rwkvkit.infer.sampling import SamplingParams, resolve_sampling
from rwkvkit.tokenizer import ByteTokenizer

BYTE = ByteTokenizer()
V = 256
GREEDY = SamplingParams(temperature=0)


def one_hot(token: int, vocab: int = V) -> torch.Tensor:
    logits = torch.full((vocab,), -10.0)  # (V,)
    logits[token] = 10.0
    return logits


def run_script(decoder: SequenceDecoder, script: bytes) -> list[DecodeStep]:
    """Step greedily through logits that predict ``script`` byte by byte (then id 0), until the end."""
    steps = []
    for i in range(len(script) + 2):
        steps.append(decoder.step(one_hot(script[i] if i < len(script) else 0)))
        if steps[-1].finish_reason is not None:
            return steps
    raise AssertionError("the decoder did not finish")


def decoder(**kwargs) -> SequenceDecoder:
    kwargs = {"vocab_size": V, "max_tokens": 100, **kwargs}
    return SequenceDecoder(BYTE, kwargs.pop("params", GREEDY), **kwargs)


def test_stop_string_is_held_back_across_tokens_and_never_shown():
    d = decoder(stop_strings=["\n\nUser:"])
    steps = run_script(d, b"ab\n\nUx\n\nUser: more")
    # "\n", "\n\n", "\n\nU" may begin the stop string: held; "x" shows it was not one
    assert [s.text for s in steps] == ["a", "b", "", "", "", "\n\nUx", "", "", "", "", "", "", ""]
    assert [s.token for s in steps] == list(b"ab\n\nUx\n\nUser:")  # every token is to be fed
    assert [s.finish_reason for s in steps] == [None] * 12 + ["stop"]
    assert d.finish_reason == "stop" and d.stop == "\n\nUser:"
    assert d.text == "ab\n\nUx" and d.tokens == list(b"ab\n\nUx\n\nUser:")


def test_a_character_split_across_tokens_is_shown_whole():
    d = decoder()
    steps = run_script(d, "é!".encode())  # é = c3 a9
    assert [s.text for s in steps] == ["", "é", "!", ""]
    assert [s.token for s in steps] == [0xC3, 0xA9, ord("!"), None]
    assert d.finish_reason == "stop" and d.stop == 0 and d.tokens == [0xC3, 0xA9, ord("!")]  # id 0: end


def test_max_tokens_flushes_an_unfinished_character_as_a_replacement():
    d = decoder(max_tokens=3)
    steps = run_script(d, b"a\xe2\x82\xac")  # the euro sign cut after two of its three bytes
    assert [s.text for s in steps] == ["a", "", "", "\ufffd"]
    assert steps[-1] == DecodeStep(None, "\ufffd", "length")
    assert d.tokens == [ord("a"), 0xE2, 0x82] and d.stop is None


def test_the_flush_at_the_end_can_still_find_a_stop_string():
    d = decoder(max_tokens=3, stop_strings=["x\ufffd"])
    steps = run_script(d, b"ax\xe2")  # "x" is held back; the cut character becomes U+FFFD at the end
    assert [s.text for s in steps] == ["a", "", "", ""]
    assert d.finish_reason == "stop" and d.stop == "x\ufffd" and d.text == "a"


def test_stop_token_is_not_part_of_the_sequence_and_releases_held_text():
    d = decoder(stop_tokens=[ord("!")], stop_strings=["ab"])
    steps = run_script(d, b"xa!b")
    assert [s.text for s in steps] == ["x", "", "a"]  # "a" may begin "ab" until the stop token ends it
    assert steps[-1] == DecodeStep(None, "a", "stop")
    assert d.stop == ord("!") and d.tokens == [ord("x"), ord("a")]


def test_zero_max_tokens_and_stepping_after_the_end():
    d = decoder(max_tokens=0)
    assert d.step(one_hot(65)) == DecodeStep(None, "", "length")
    with pytest.raises(RwkvkitError, match="finished"):
        d.step(one_hot(65))


def test_interrupting_releases_the_held_text():
    d = decoder(stop_strings=["zz"])
    assert d.step(one_hot(ord("a"))).text == "a"
    assert d.step(one_hot(ord("z"))).text == ""
    assert d.finish("interrupted") == DecodeStep(None, "z", "interrupted")
    assert d.text == "az"


def test_penalties_follow_the_reference_rule():
    """The reference: logit[t] -= presence + frequency * occurrence[t] for every t generated so far; after
    each token, occurrence[t] *= decay for every t, then occurrence[token] += 1."""
    presence, frequency, decay = 0.5, 0.25, 0.9
    base = torch.full((V,), -5.0)
    base[5], base[6], base[7] = 1.0, 0.6, 0.3
    occurrence: dict[int, float] = {}
    expected = []
    for _ in range(12):
        adjusted = base.clone()
        for t, count in occurrence.items():
            adjusted[t] -= presence + frequency * count
        token = int(adjusted.argmax())
        expected.append(token)
        for t in occurrence:
            occurrence[t] *= decay
        occurrence[token] = occurrence.get(token, 0.0) + 1.0
    assert len(set(expected)) == 3  # the penalties really change the choice
    params = SamplingParams(
        temperature=0, presence_penalty=presence, frequency_penalty=frequency, penalty_decay=decay
    )
    d = decoder(params=params, max_tokens=12, stop_tokens=())
    while d.step(base).finish_reason is None:
        pass
    assert d.tokens == expected


def test_logit_bias_bans_and_the_tokenizers_vocabulary():
    logits = torch.zeros(300)  # a model vocabulary padded past the tokenizer's 256 ids
    logits[280], logits[70], logits[71], logits[72] = 50.0, 3.0, 2.0, 1.0
    assert decoder(vocab_size=300).step(logits).token == 70  # 280 cannot be decoded: never sampled
    banned = SamplingParams(temperature=0, banned_tokens=[70])
    assert decoder(params=banned, vocab_size=300).step(logits).token == 71
    biased = SamplingParams(temperature=0, logit_bias={72: 5.0})
    assert decoder(params=biased, vocab_size=300).step(logits).token == 72
    with pytest.raises(RwkvkitError, match="every token"):
        decoder(params=SamplingParams(banned_tokens=list(range(V)))).step(logits)


def test_a_seed_gives_the_same_draws():
    params = SamplingParams(temperature=1.0, seed=3)
    logits = torch.zeros(V)  # uniform: any token
    a, b = decoder(params=params, stop_tokens=()), decoder(params=params, stop_tokens=())
    assert [a.step(logits).token for _ in range(20)] == [b.step(logits).token for _ in range(20)]


def test_bad_settings_are_named():
    for kwargs, match in [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"stop_strings": [""]}, "stop strings"),
        ({"params": SamplingParams(top_p=0)}, "top_p"),
        ({"params": SamplingParams(logit_bias={V: 1.0})}, "logit_bias"),
    ]:
        with pytest.raises(RwkvkitError, match=match):
            decoder(**kwargs)


def test_check_int_and_resolve_sampling():
    assert check_int("n", 3, 1) == 3
    for bad in (0, True, 2.0, "3"):
        with pytest.raises(RwkvkitError, match="n must be an integer >= 1"):
            check_int("n", bad, 1)
    defaults = {"temperature": 1.0, "top_p": 0.85}
    assert resolve_sampling(None, defaults, temperature=0.5, top_p=None) == SamplingParams(0.5, 0.85)
    given = SamplingParams(temperature=0)
    assert resolve_sampling(given, defaults, temperature=None) is given
    with pytest.raises(RwkvkitError, match="not both"):
        resolve_sampling(given, defaults, temperature=0.5)


def test_prefill_spans():
    assert list(prefill_spans(0, 10, 4)) == [(0, 4), (4, 8), (8, 10)]
    assert list(prefill_spans(3, 20, 8, block_size=8)) == [(3, 8), (8, 16), (16, 20)]
    assert list(prefill_spans(5, 30, 4, block_size=16)) == [
        (5, 9), (9, 13), (13, 16), (16, 20), (20, 24), (24, 28), (28, 30)
    ]  # fmt: skip
    assert list(prefill_spans(7, 7, 4)) == []
