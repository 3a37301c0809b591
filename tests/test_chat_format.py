"""The one World chat format (rwkvkit.infer.chat_format) and the request field a failed check names
(RwkvkitError.param), which the server answers as the error's ``param``."""

from __future__ import annotations

import pickle

import pytest

from rwkvkit.errors import RwkvkitError
from rwkvkit.infer.chat_format import (
    STOP_STRING,
    format_conversation,
    format_system_turn,
    format_user_turn,
    normalize_message,
)
from rwkvkit.infer.sampling import SamplingParams, check_sampling_args


def test_a_conversation_reads_as_the_chat_session_turns():
    assert format_conversation([("user", "Hi")]) == format_user_turn("Hi")
    system_then_user = format_system_turn("Be kind.") + format_user_turn("Hi", first=False)
    assert format_conversation([("system", "Be kind."), ("user", "Hi")]) == system_then_user
    assert format_conversation([("developer", "Be kind."), ("user", "Hi")]) == system_then_user
    text = format_conversation([("user", "a\r\n\r\nb"), ("assistant", ""), ("user", " c ")])
    assert text == "User: a\nb\n\nAssistant:\n\nUser: c\n\nAssistant:"
    assert STOP_STRING == "\n\nUser:"
    assert normalize_message(" x \n \n y ") == "x \n y"


def test_rwkvkit_error_param_is_optional_and_survives_pickling():
    plain = RwkvkitError("plain")
    assert plain.param is None and str(plain) == "plain" and plain.args == ("plain",)
    named = RwkvkitError("top_p must be in (0, 1], got 2", param="top_p")
    assert named.param == "top_p" and str(named) == "top_p must be in (0, 1], got 2"
    assert str(pickle.loads(pickle.dumps(named))) == str(named)


@pytest.mark.parametrize(
    ("params", "param"),
    [
        (SamplingParams(temperature=-1.0), "temperature"),
        (SamplingParams(top_p=0.0), "top_p"),
        (SamplingParams(top_k=-1), "top_k"),
        (SamplingParams(min_p=2.0), "min_p"),
        (SamplingParams(presence_penalty=3.0), "presence_penalty"),
        (SamplingParams(frequency_penalty=-3.0), "frequency_penalty"),
        (SamplingParams(penalty_decay=2.0), "penalty_decay"),
        (SamplingParams(logit_bias={99: 1.0}), "logit_bias"),
        (SamplingParams(logit_bias={1: 500.0}), "logit_bias"),
        (SamplingParams(seed="x"), "seed"),  # type: ignore[arg-type]
    ],
)
def test_sampling_checks_name_their_field(params, param):
    with pytest.raises(RwkvkitError) as info:
        params.check(vocab_size=10)
    assert info.value.param == param


def test_check_sampling_args_names_the_argument():
    with pytest.raises(RwkvkitError) as info:
        check_sampling_args(1.0, 1.5, 0)
    assert info.value.param == "top_p"
