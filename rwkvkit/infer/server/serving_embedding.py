"""``POST /v1/embeddings`` on the shared serving path: one vector per input, from the state after it."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import torch
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from rwkvkit.infer.engine import FinishEvent
from rwkvkit.infer.sampling import SamplingParams
from rwkvkit.infer.server.bridge import ClientGone, next_event
from rwkvkit.infer.server.protocol import ApiError, EmbeddingRequest
from rwkvkit.infer.server.serving import Serving
from rwkvkit.state import RWKVState

MAX_EMBEDDING_INPUTS = 2048


def embedding_vector(state: RWKVState) -> torch.Tensor:
    """The embedding of the text a (B = 1) state has read: the last layer's ``ffn_shift`` row (the
    normalised input of its channel mix at the last token), as float32 on the CPU, L2-normalised."""
    vector = state.ffn_shift[-1, 0].detach().to(device="cpu", dtype=torch.float32)
    return vector / vector.norm().clamp_min(1e-12)


class EmbeddingServing(Serving):
    """``POST /v1/embeddings``: each input runs through the engine with ``max_tokens=0`` (sharing its
    batching, queue and prefix cache), at most ``max_batch`` of one request at a time."""

    def inputs(self, value: str | list) -> list[list[int]]:
        if isinstance(value, str):
            items: list = [value]
        elif value and all(isinstance(v, int) for v in value):
            items = [list(value)]
        else:
            items = list(value)
        if not items:
            raise ApiError(400, "'input' is empty", param="input")
        if len(items) > MAX_EMBEDDING_INPUTS:
            raise ApiError(400, f"at most {MAX_EMBEDDING_INPUTS} inputs per request", param="input")
        return [self._input_tokens(item) for item in items]

    def _input_tokens(self, item: str | list[int]) -> list[int]:
        tokens = self.encode(item, "input") if isinstance(item, str) else list(item)
        if not tokens:
            raise ApiError(400, "an input is empty: each needs at least one token", param="input")
        bad = [t for t in tokens if not 0 <= t < self.vocab_size]
        if bad:
            raise ApiError(
                400,
                f"input token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})",
                param="input",
            )
        return tokens

    async def create(self, body: EmbeddingRequest, http_request: Request) -> Response:
        self.context.check_model(body.model)
        n_embd = self.engine.model.config.n_embd
        if body.dimensions is not None and body.dimensions != n_embd:
            raise ApiError(400, f"dimensions must be {n_embd} (this model's n_embd)", param="dimensions")
        inputs = self.inputs(body.input)
        in_flight: dict[int, Any] = {}  # input index -> engine request
        try:
            finished = await self._run_all(inputs, in_flight, http_request)
        except ClientGone:
            self._cancel_all(in_flight)
            return self.client_gone()
        except BaseException:
            self._cancel_all(in_flight)
            raise
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": _encode_vector(event.state, body.encoding_format),
            }
            for i, event in enumerate(finished)
        ]
        n_tokens = sum(len(t) for t in inputs)
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "model": self.context.model_name,
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
            }
        )

    async def _run_all(
        self, inputs: list[list[int]], in_flight: dict[int, Any], http_request: Request
    ) -> list[FinishEvent]:
        """Every input's FinishEvent, keeping at most ``max_batch`` of them on the engine at once."""
        params = SamplingParams(temperature=0.0)
        queue: asyncio.Queue = asyncio.Queue()
        finished: list[Any] = [None] * len(inputs)
        next_input = 0
        while next_input < len(inputs) or in_flight:
            while next_input < len(inputs) and len(in_flight) < self.engine.max_batch:
                try:
                    in_flight[next_input] = self.submit(
                        inputs[next_input],
                        params,
                        0,
                        [],
                        None,
                        queue,
                        tag=next_input,
                        texts=False,
                        stop_tokens=(),
                    )
                except ApiError as e:
                    if e.status == 429 and in_flight:
                        break  # wait for one of ours to finish, then try again
                    raise
                next_input += 1
            tag, event = await next_event(http_request, queue)
            in_flight.pop(tag, None)
            self.check_finish(event)
            finished[tag] = event
        return finished

    def _cancel_all(self, in_flight: dict[int, Any]) -> None:
        for handle in in_flight.values():
            self.engine.cancel(handle)


def _encode_vector(state: RWKVState, encoding_format: str | None) -> Any:
    vector = embedding_vector(state)
    if encoding_format == "base64":
        return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()
