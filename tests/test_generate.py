"""Tests for rwkvkit.infer.generate: prefill, the decode loop, stopping rules and streaming.

Two kinds of model: a small random RWKV-7 (checks the real state-carrying path against full-sequence
recomputation) and a scripted fake model that emits a fixed byte sequence (checks streaming and
stop-string rules on chosen text, including multi-byte characters).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from checkpoints import random_v7_state_dict

from rwkvkit.errors import RwkvkitError
from rwkvkit.infer import GenerationStream, StopStringFilter, generate, generate_text, prefill
from rwkvkit.models import model_from_state_dict
from rwkvkit.tokenizer import load_tokenizer

# Models with 128 ids and the byte tokenizer generate ASCII only: one token is one character, which makes
# text positions and token positions the same. The 256-id model also produces arbitrary (invalid) UTF-8.
VOCAB = 128


@pytest.fixture(scope="module")
def model():
    return model_from_state_dict(random_v7_state_dict(vocab_size=VOCAB, seed=3))


@pytest.fixture(scope="module")
def model256():
    return model_from_state_dict(random_v7_state_dict(vocab_size=256, seed=4))


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("byte")


PROMPT = [72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33]  # "Hello, world!"


def _greedy_by_recomputation(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding that reruns the whole sequence every step: no state is carried between steps."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([seq]))  # (1, T, V)
            seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt) :]


def _assert_states_close(a, b):
    for name in ("att_shift", "wkv", "ffn_shift"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------ real model


def test_greedy_matches_full_sequence_recomputation(model, tok):
    n = 24
    result = generate_text(model, tok, PROMPT, max_tokens=n, temperature=0, stop_tokens=())
    assert result.tokens == _greedy_by_recomputation(model, PROMPT, n)
    assert result.finish_reason == "length" and result.prompt_tokens == len(PROMPT)
    # The final state has consumed the prompt and every generated token.
    with torch.no_grad():
        _, full_state = model(torch.tensor([PROMPT + result.tokens]))
    _assert_states_close(result.state, full_state)


def test_text_prompt_equals_token_prompt(model, tok):
    a = generate_text(model, tok, "Hello, world!", max_tokens=8, temperature=0, stop_tokens=())
    b = generate_text(model, tok, PROMPT, max_tokens=8, temperature=0, stop_tokens=())
    assert a.tokens == b.tokens and a.text == b.text


@pytest.mark.parametrize("chunk", [1, 3, 256])
def test_chunked_prefill_is_chunk_size_independent(model, tok, chunk):
    with torch.no_grad():
        full_logits, full_state = model(torch.tensor([PROMPT]))
    logits, state = prefill(model, PROMPT, chunk_size=chunk)
    assert logits.shape == (VOCAB,)
    torch.testing.assert_close(logits, full_logits[0, -1], atol=1e-4, rtol=1e-4)
    _assert_states_close(state, full_state)
    result = generate_text(
        model, tok, PROMPT, max_tokens=10, temperature=0, stop_tokens=(), prefill_chunk=chunk
    )
    assert result.tokens == _greedy_by_recomputation(model, PROMPT, 10)


def test_prefill_runs_bounded_chunks_with_last_only(model):
    calls = []

    class Spy:
        config, device = model.config, model.device

        def __call__(self, tokens, state=None, last_only=False):
            calls.append((tokens.shape[1], last_only))
            return model(tokens, state, last_only=last_only)

    prefill(Spy(), list(range(1, 11)), chunk_size=4)
    assert calls == [(4, True), (4, True), (2, True)]


def test_stop_string_across_tokens_is_not_emitted(model, tok):
    full = generate_text(model, tok, PROMPT, max_tokens=40, temperature=0, stop_tokens=())
    assert len(full.text) >= 12
    stop = full.text[5:9]  # four bytes = four tokens
    first = full.text.find(stop)
    result = generate_text(
        model, tok, PROMPT, max_tokens=40, temperature=0, stop_tokens=(), stop_strings=[stop]
    )
    assert result.text == full.text[:first]
    assert stop not in result.text
    assert result.finish_reason == "stop" and result.stop == stop
    # the tokens that spelled the stop string were generated (and consumed by the state)
    assert result.tokens == full.tokens[: first + len(stop)]


def test_stop_token_ends_generation_without_being_emitted(model, tok):
    full = generate_text(model, tok, PROMPT, max_tokens=30, temperature=0, stop_tokens=())
    stop_token = full.tokens[6]
    first = full.tokens.index(stop_token)
    result = generate_text(model, tok, PROMPT, max_tokens=30, temperature=0, stop_tokens=[stop_token])
    assert result.tokens == full.tokens[:first]
    assert result.text == tok.decode(full.tokens[:first])
    assert result.finish_reason == "stop" and result.stop == stop_token


@pytest.mark.parametrize("n", [0, 1, 7])
def test_max_tokens(model, tok, n):
    result = generate_text(
        model, tok, PROMPT, max_tokens=n, temperature=1.0, top_p=1.0, seed=0, stop_tokens=()
    )
    assert len(result.tokens) == n and result.finish_reason == "length"
    if n == 0:
        assert result.text == ""


def test_seed_reproducibility(model, tok):
    def run(seed):
        return generate_text(
            model, tok, PROMPT, max_tokens=30, temperature=1.0, top_p=1.0, seed=seed, stop_tokens=()
        ).tokens

    assert run(11) == run(11)
    assert run(11) != run(12)


def test_streaming_pieces_concatenate_to_text(model256, tok):
    stream = generate(
        model256, tok, PROMPT, max_tokens=60, temperature=1.0, top_p=1.0, seed=5, stop_tokens=()
    )
    assert isinstance(stream, GenerationStream)
    pieces = list(stream)
    result = stream.result
    assert result is not None
    assert "".join(pieces) == result.text
    assert all(piece and isinstance(piece, str) for piece in pieces)
    for piece in pieces:
        piece.encode("utf-8")  # raises on a lone surrogate
    assert result.text == tok.decode(result.tokens)


def test_continuing_from_the_final_state(model, tok):
    """Generating after result.state equals generating from scratch after prompt + generated tokens."""
    first = generate_text(model, tok, PROMPT, max_tokens=5, temperature=0, stop_tokens=())
    follow = [10, 65, 66]
    before = first.state.clone()
    cont = generate_text(model, tok, follow, max_tokens=6, temperature=0, stop_tokens=(), state=first.state)
    scratch = generate_text(
        model, tok, PROMPT + first.tokens + follow, max_tokens=6, temperature=0, stop_tokens=()
    )
    assert cont.tokens == scratch.tokens
    _assert_states_close(first.state, before)  # the given state is not modified


def test_empty_prompt_is_an_error(model, tok):
    for prompt in ("", []):
        with pytest.raises(RwkvkitError, match="empty prompt"):
            generate(model, tok, prompt)
    state = model.zero_state(1)
    with pytest.raises(RwkvkitError, match="empty prompt"):
        generate(model, tok, "", state=state)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"prompt": [VOCAB]}, "outside"),
        ({"prompt": [-1]}, "outside"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"prefill_chunk": 0}, "chunk"),
        ({"stop_strings": [""]}, "stop"),
    ],
)
def test_bad_arguments_raise_before_running(model, tok, kwargs, match):
    kwargs = {"prompt": PROMPT, **kwargs}
    with pytest.raises(RwkvkitError, match=match):
        generate(model, tok, **kwargs)  # raised eagerly, without iterating


def test_incompatible_state_is_an_error(model, tok):
    other = model_from_state_dict(random_v7_state_dict(n_layer=1, vocab_size=VOCAB))
    with pytest.raises(RwkvkitError, match="state"):
        generate(model, tok, PROMPT, state=other.zero_state(1))


# ------------------------------------------------------------------------------------------ scripted model


class ScriptedModel:
    """Emits ``script`` (token ids) after a prompt of ``prompt_len`` tokens, then token 0 forever.

    The "state" is just the number of tokens seen so far.
    """

    def __init__(self, script: list[int], prompt_len: int, vocab_size: int = 256):
        self.script, self.prompt_len = script, prompt_len
        self.config = SimpleNamespace(vocab_size=vocab_size)
        self.device = torch.device("cpu")

    def __call__(self, tokens, state=None, last_only=False):
        seen = (state or 0) + tokens.shape[1]
        step = seen - self.prompt_len
        nxt = self.script[step] if 0 <= step < len(self.script) else 0
        logits = torch.full((1, 1, self.config.vocab_size), -10.0)
        logits[0, 0, nxt] = 10.0
        return logits, seen


def _scripted(text: str | bytes, prompt: list[int]) -> ScriptedModel:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return ScriptedModel(list(data), len(prompt))


def _run(model, tok, prompt, **kwargs):
    stream = generate(model, tok, prompt, temperature=0, **kwargs)
    pieces = list(stream)
    return pieces, stream.result


MULTIBYTE = "héllo wörld, ünïcödé 🙂 ok\n\nUser: more text"


def test_streaming_never_splits_a_character(tok):
    prompt = [65]
    pieces, result = _run(_scripted(MULTIBYTE, prompt), tok, prompt, max_tokens=200)
    assert result.text == MULTIBYTE and result.finish_reason == "stop" and result.stop == 0
    assert "".join(pieces) == MULTIBYTE
    assert not any("\ufffd" in p for p in pieces)
    # one piece per completed character: the emoji's four bytes come out as one piece
    assert "🙂" in pieces


def test_default_stop_token_is_end_of_text(tok):
    prompt = [65]
    model = _scripted(b"abc\x00def", prompt)
    _, result = _run(model, tok, prompt, max_tokens=50)
    assert result.text == "abc" and result.finish_reason == "stop" and result.stop == 0
    _, result = _run(model, tok, prompt, max_tokens=5, stop_tokens=())
    assert result.text == "abc\x00d" and result.finish_reason == "length"


def test_stop_string_held_back_then_released(tok):
    prompt = [65]
    # "\n\nUs" looks like the start of the stop string but the text goes on differently.
    model = _scripted("one\n\nUs two\n\nUser: three", prompt)
    pieces, result = _run(model, tok, prompt, max_tokens=200, stop_strings=["\n\nUser:"])
    assert result.text == "one\n\nUs two"
    assert result.finish_reason == "stop" and result.stop == "\n\nUser:"
    assert "".join(pieces) == result.text
    assert not any(p.endswith("\n") for p in pieces)  # the newlines were held until disambiguated


def test_earliest_of_several_stop_strings_wins(tok):
    prompt = [65]
    model = _scripted("alpha beta gamma delta", prompt)
    _, result = _run(model, tok, prompt, max_tokens=200, stop_strings=["delta", "ta gam", "zzz"])
    assert result.text == "alpha be" and result.stop == "ta gam"


def test_held_back_prefix_is_released_at_the_length_limit(tok):
    prompt = [65]
    model = _scripted("abc\n\nUs", prompt)
    pieces, result = _run(model, tok, prompt, max_tokens=7, stop_strings=["\n\nUser:"])
    assert result.text == "abc\n\nUs" and result.finish_reason == "length"
    assert pieces[-1].endswith("\n\nUs")


def test_stop_string_inside_a_multibyte_stream(tok):
    prompt = [65]
    model = _scripted("ça va? 🙂🙂 fin", prompt)
    _, result = _run(model, tok, prompt, max_tokens=200, stop_strings=["🙂🙂"])
    assert result.text == "ça va? " and result.stop == "🙂🙂"


def test_invalid_utf8_bytes_do_not_break_streaming(tok):
    prompt = [65]
    model = _scripted(b"ok \xff\xfe then \xe2\x82 cut \xf0\x9f\x99\x82 end", prompt)
    pieces, result = _run(model, tok, prompt, max_tokens=200)
    assert "".join(pieces) == result.text == tok.decode(result.tokens)
    for piece in pieces:
        piece.encode("utf-8")


# ------------------------------------------------------------------------------------------ filter unit


def test_stop_string_filter_unit():
    f = StopStringFilter(["abc", "b!"])
    assert f.push("xa") == ("x", None)  # "a" may start "abc"
    assert f.push("b") == ("", None)  # "ab" may start "abc"; "b" may start "b!"
    assert f.push("x") == ("abx", None)
    assert f.push("yab") == ("y", None)
    assert f.push("!tail") == ("a", "b!")
    assert f.flush() == ""
    g = StopStringFilter([])
    assert g.push("anything") == ("anything", None)


def test_bf16_prefill_is_close_to_fp32_and_off_by_default():
    """--bf16-prefill runs the prompt's matmuls in bf16 (where the CPU has bf16): within bf16 rounding of
    the fp32 prefill; without it the prefill is exactly the model's fp32 forward."""
    from checkpoints import random_state_dict

    from rwkvkit.infer.generate import bf16_prefill_supported, prefill
    from rwkvkit.models import model_from_state_dict

    model = model_from_state_dict(random_state_dict("7", n_layer=2, n_embd=64, vocab_size=97, seed=3))
    tokens = torch.randint(0, 97, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    exact, exact_state = prefill(model, tokens, chunk_size=64)
    with torch.inference_mode():
        whole, whole_state = model(torch.tensor([tokens]))
    assert torch.allclose(exact, whole[0, -1], atol=1e-5)
    fast, fast_state = prefill(model, tokens, chunk_size=64, bf16=True)
    scale = exact.abs().max().item()
    if bf16_prefill_supported(model):
        assert not torch.equal(fast, exact)  # it really ran in bf16
    assert (fast - exact).abs().max().item() < 0.05 * scale
    assert fast_state.wkv.dtype == torch.float32
    assert (fast_state.wkv - exact_state.wkv).abs().max().item() < 0.05 * exact_state.wkv.abs().max().item()


def test_sampling_params_and_the_older_loose_arguments_agree(model, tok):
    """generate takes sampling=SamplingParams(...); temperature/top_p/top_k/seed keep working for a
    release (and mean the same), but not together with it."""
    from rwkvkit.infer import SamplingParams

    loose = generate_text(
        model, tok, PROMPT, max_tokens=20, temperature=1.0, top_p=0.9, seed=4, stop_tokens=()
    )
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=4)
    given = generate_text(model, tok, PROMPT, max_tokens=20, sampling=params, stop_tokens=())
    assert given.tokens == loose.tokens and given.text == loose.text
    with pytest.raises(RwkvkitError, match="not both"):
        generate(model, tok, PROMPT, temperature=0.5, sampling=params)
    with pytest.raises(RwkvkitError, match="presence_penalty"):
        generate(model, tok, PROMPT, sampling=SamplingParams(presence_penalty=5.0))
