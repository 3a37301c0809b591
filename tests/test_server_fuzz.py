"""Fuzzing ``rwkvkit serve`` with schemathesis against its own OpenAPI schema (in-process, over ASGI).

Every operation gets a bounded, derandomized run of valid (positive) and invalid (negative) requests,
sent with and without the API key, and with the right model name or a generated one. No response may
be a 5xx, nothing may raise, and the server must still answer a normal request afterwards.
"""

from __future__ import annotations

import time

import httpx
import pytest
import schemathesis
from checkpoints import random_state_dict
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from rwkvkit.infer.cache import PrefixCache
from rwkvkit.infer.engine import Engine
from rwkvkit.infer.server import create_app
from rwkvkit.models import model_from_state_dict
from rwkvkit.tokenizer import load_tokenizer

KEY = "fuzz-key"
MODEL = "fuzz-model"
EXAMPLES = 60  # per operation and generation mode
BUDGET_S = 90  # the whole run; normally ~20 s


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    sd = random_state_dict("7", n_layer=1, n_embd=32, head_size=16, vocab_size=256, seed=21)
    engine = Engine(
        model_from_state_dict(sd),
        load_tokenizer("byte"),
        max_batch=4,
        max_waiting=4,
        cache=PrefixCache(2**22),
    )
    engine.start()
    state_dir = tmp_path_factory.mktemp("fuzz") / "states"
    app = create_app(engine, MODEL, api_key=KEY, max_tokens_limit=8, state_dir=state_dir)
    yield app, engine, state_dir
    engine.shutdown()


def test_no_server_errors_under_fuzzing(served):
    app, engine, state_dir = served
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = sorted(op.label for op in operations)
    assert labels == sorted(
        [
            "GET /health",
            "GET /metrics",
            "GET /tokenizer_info",
            "POST /tokenize",
            "POST /detokenize",
            "GET /v1/models",
            "GET /v1/models/{model_id}",
            "POST /v1/completions",
            "POST /v1/chat/completions",
            "POST /v1/embeddings",
        ]
    ), labels
    statuses: dict[int, int] = {}
    started = time.monotonic()

    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                derandomize=True,
                database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            # mostly with the key and this server's model name (hypothesis favours the first choice)
            @given(
                case=operation.as_strategy(generation_mode=mode),
                with_key=st.sampled_from([True, True, True, False]),
                ours=st.sampled_from([True, True, False]),
            )
            def run(case, with_key: bool, ours: bool) -> None:
                if ours and isinstance(case.body, dict) and "model" in case.body:
                    case.body["model"] = MODEL  # reach past the model check too
                if with_key:  # else: no key, or the one schemathesis made up from the security scheme
                    headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
                    case.headers = {**headers, "Authorization": f"Bearer {KEY}"}
                response = case.call()
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
                content_type = {k.lower(): v for k, v in response.headers.items()}.get("content-type", [""])
                if response.status_code >= 400 and "application/json" in str(content_type):
                    error = response.json()["error"]
                    assert set(error) == {"message", "type", "param", "code"}, error
                    assert "Traceback" not in error["message"]

            try:
                run()
            except Unsatisfiable:  # nothing to make invalid (an operation without parameters or body)
                assert mode == GenerationMode.NEGATIVE and operation.method.upper() == "GET", operation.label
            assert time.monotonic() - started < BUDGET_S, "fuzzing took too long"

    assert sum(n for s, n in statuses.items() if 200 <= s < 300) > 0, statuses  # some requests got through
    assert sum(n for s, n in statuses.items() if 400 <= s < 500) > 0, statuses
    # nothing outside the state directory, and the server still serves
    assert all(p.parent == state_dir for p in state_dir.rglob("*"))
    transport = httpx.ASGITransport(app=app)

    async def one_request() -> httpx.Response:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post(
                "/v1/completions",
                json={"model": MODEL, "prompt": "still alive?", "max_tokens": 3},
                headers={"Authorization": f"Bearer {KEY}"},
            )

    import asyncio

    response = asyncio.run(one_request())
    assert response.status_code == 200, response.text
    stats = engine.stats()
    assert stats["running"] == 0 or stats["running"] <= engine.max_batch
