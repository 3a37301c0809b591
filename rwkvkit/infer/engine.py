"""The inference engine: many sequences decoded together, each with its own state and sampling settings.

Continuous batching. Requests wait in a bounded queue (``submit`` raises :class:`EngineFull` when it is
full) and join the running set between steps, up to ``max_batch``; a finished or cancelled request
leaves at once and frees its slot. One :meth:`Engine.step`:

1. drops cancelled requests;
2. admits waiting requests; with a prefix cache (:class:`rwkvkit.infer.cache.PrefixCache`), a prompt
   that extends a cached prefix starts from the cached state and only its new tokens are prefilled
   (the states at the cache's block boundaries and at the prompt's end are cached on the way);
3. prefills ONE chunk (at most ``prefill_chunk`` tokens) of the oldest request still reading its prompt,
   so a long prompt never stalls the running sequences for more than one chunk per step;
4. steps every decoding sequence's :class:`~rwkvkit.infer.decoding.SequenceDecoder` on its row of
   logits (its own temperature, top-p/k, min-p, penalties, bias, bans, seed, stop tokens, stop strings
   held back across token boundaries, max_tokens), then runs all continuing sequences through the model
   in ONE batched call (B, 1).

The decoding sequences' states live in one batched :class:`RWKVState` (row i = ``self._decoding[i]``),
regrouped only when a sequence joins or leaves. The per-sequence work is the same ``SequenceDecoder``
that :func:`rwkvkit.infer.generate.generate` uses, and the prompt is prefilled in the same spans as
:func:`rwkvkit.infer.cache.prefill_with_cache` (``prefill_spans``), so a greedy sequence produces the
same text alone, in a batch, or through ``generate``.

Threading: :meth:`start` runs the step loop in a background thread that sleeps while there is no work;
``submit`` / ``cancel`` may be called from any thread. Each request reports through its
``on_event`` callback, called on the engine thread with :class:`TextEvent` and, last, :class:`FinishEvent`.

Choices and scores. :meth:`Engine.submit_group` runs one prompt for several sampling settings (a server's
``n``): the first request prefills the prompt once and the others start decoding from a copy of its state
and logits (an RWKV prefix is one fixed-size state). A request may record its generated tokens'
log-probabilities (``top_logprobs``) and score its own prompt (``score_prompt``: each prompt token's
log-probability, :mod:`rwkvkit.infer.logprobs`); a scored prompt is prefilled in full precision and
does not start from the prefix cache (every position is needed).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from rwkvkit.errors import RwkvkitError
from rwkvkit.infer.decoding import SequenceDecoder, sample_rows
from rwkvkit.infer.generate import prefill, prefill_spans
from rwkvkit.infer.logprobs import TokenLogprob, check_top_logprobs, score_prompt
from rwkvkit.infer.sampling import SamplingParams
from rwkvkit.state import RWKVState
from rwkvkit.state_io import model_fingerprint


class EngineFull(RwkvkitError):
    """The waiting queue is full: try again later (HTTP 429)."""


@dataclass
class TextEvent:
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of the tokens since the last event
    prompt_logprobs: list[TokenLogprob | None] | None = None  # once, before any text, if scored


@dataclass
class FinishEvent:
    """The end of a request: why, token counts, and the state after the prompt and generated tokens."""

    reason: str  # "stop", "length", "cancelled" or "error"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    text: str
    tokens: list[int]
    state: RWKVState | None = None
    stop: int | str | None = None
    error: str | None = None
    bad_request: bool = False  # the error comes from the request's own settings (HTTP 400), not the engine
    logprobs: list[TokenLogprob] | None = None  # per generated token (then the stop token), if recorded
    prompt_logprobs: list[TokenLogprob | None] | None = None  # per prompt token, if scored


@dataclass
class Request:
    """One sequence in the engine. Create through :meth:`Engine.submit`."""

    id: int
    prompt: list[int]
    decoder: SequenceDecoder  # sampling, stops, text: everything per token
    on_event: Callable[[TextEvent | FinishEvent], None]
    initial_state: RWKVState | None = None
    score_top: int | None = None  # score the prompt's tokens with this many alternatives (None: don't)
    followers: list[Request] = field(default_factory=list)  # start from this one's prefilled prompt
    # progress
    prompt_logprobs: list[TokenLogprob | None] | None = None
    state: RWKVState | None = None  # while reading the prompt: the state after prompt[:prefilled]
    prefilled: int = 0
    cached_tokens: int = 0
    logits: torch.Tensor | None = None  # (V,) after the last token fed
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)

    @property
    def params(self) -> SamplingParams:
        return self.decoder.params

    @property
    def generated(self) -> list[int]:
        """The tokens generated so far (stop token excluded)."""
        return self.decoder.tokens

    @property
    def slots(self) -> int:
        """The decoding slots this request and its followers take."""
        return 1 + len(self.followers)

    def cancel(self) -> None:
        """Stop this request at the next engine step (its slot is freed then)."""
        self.cancelled = True


class Engine:
    """Continuous-batching decoder over one model (see the module docstring)."""

    def __init__(
        self,
        model,
        tokenizer,
        max_batch: int = 16,
        max_waiting: int = 64,
        prefill_chunk: int = 256,
        cache=None,
        bf16_prefill: bool = False,
        cuda_graphs: bool = False,
    ):
        if max_batch < 1 or max_waiting < 0 or prefill_chunk < 1:
            raise ValueError("max_batch and prefill_chunk must be >= 1, max_waiting >= 0")
        self.model = model
        # decode steps replayed from CUDA graphs (one per power-of-two batch size), for a model on a GPU
        self.graphs = None
        if cuda_graphs:
            from rwkvkit.infer.cuda_graph import CUDAGraphPool  # CUDA only: CPU engines never load it

            self.graphs = CUDAGraphPool(model, max_batch)
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.prefill_chunk = prefill_chunk
        self.bf16_prefill = bf16_prefill  # prompts' matmuls in bf16 where the CPU has it (generate.prefill)
        self.cache = cache  # a rwkvkit.infer.cache.PrefixCache or None
        if cache is not None:
            cache.bind_model(model_fingerprint(model))  # one cache serves one model
        self.vocab_size = model.config.vocab_size
        self._lock = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._prefilling: list[Request] = []
        self._decoding: list[Request] = []
        self._batch_state: RWKVState | None = None  # rows = self._decoding
        # the requests of the last model call and its logits (B, V), row i = theirs: sampled without a copy
        self._fed: tuple[list[Request], torch.Tensor | None] = ([], None)
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._stop = False
        self.counters = {
            "requests": 0,
            "rejected": 0,
            "finished": 0,
            "cancelled": 0,
            "failed": 0,
            "prompt_tokens": 0,
            "cached_prompt_tokens": 0,
            "generated_tokens": 0,
        }
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens generated in a step)

    # ------------------------------------------------------------------------------------------ public

    def submit(
        self,
        prompt: Sequence[int],
        params: SamplingParams | None = None,
        max_tokens: int = 200,
        stop_tokens: Sequence[int] | None = None,
        stop_strings: Sequence[str] = (),
        state: RWKVState | None = None,
        on_event: Callable[[TextEvent | FinishEvent], None] | None = None,
        top_logprobs: int | None = None,
        score_prompt: int | None = None,
    ) -> Request:
        """Queue a request; returns it (``cancel()`` it to stop early). Checked here, before queueing:
        empty prompt, out-of-vocabulary ids, bad sampling parameters, an incompatible state.

        ``top_logprobs``: record each generated token's log-probability with that many alternatives;
        ``score_prompt``: also score the prompt's tokens, with that many alternatives (None: neither).
        """
        return self.submit_group(
            prompt,
            [params],
            max_tokens=max_tokens,
            stop_tokens=stop_tokens,
            stop_strings=stop_strings,
            state=state,
            on_event=[on_event],
            top_logprobs=top_logprobs,
            score_prompt=score_prompt,
        )[0]

    def submit_group(
        self,
        prompt: Sequence[int],
        params: Sequence[SamplingParams | None],
        max_tokens: int = 200,
        stop_tokens: Sequence[int] | None = None,
        stop_strings: Sequence[str] = (),
        state: RWKVState | None = None,
        on_event: Sequence[Callable[[TextEvent | FinishEvent], None] | None] | None = None,
        top_logprobs: int | None = None,
        score_prompt: int | None = None,
        constraint: Callable[[], object] | None = None,
    ) -> list[Request]:
        """Queue one request per entry of ``params`` on the same prompt (``on_event[i]`` reports the
        i-th): the prompt is prefilled once, then each decodes from a copy of that state with its own
        settings and random stream. They take ``len(params)`` slots together (at most ``max_batch``).
        ``constraint`` makes each one's grammar matcher (see :class:`SequenceDecoder`)."""
        if not 1 <= len(params) <= self.max_batch:
            raise RwkvkitError(
                f"{len(params)} choices for one prompt: this engine runs 1 to {self.max_batch} "
                "sequences at a time",
                param="n",
            )
        callbacks = list(on_event) if on_event is not None else [None] * len(params)
        decoders = [
            SequenceDecoder(
                self.tokenizer,
                p,
                vocab_size=self.vocab_size,
                max_tokens=max_tokens,
                stop_tokens=stop_tokens,
                stop_strings=stop_strings,
                top_logprobs=top_logprobs,
                constraint=constraint() if constraint is not None else None,
            )
            for p in params
        ]
        if score_prompt is not None:
            check_top_logprobs("score_prompt", score_prompt)
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise RwkvkitError(
                "empty prompt: at least one token is needed to start generating", param="prompt"
            )
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise RwkvkitError(
                f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})", param="prompt"
            )
        if state is not None:
            state.check_compatible(self.model.config, 1)
        requests = [
            Request(
                id=next(self._ids),
                prompt=prompt,
                decoder=decoder,
                on_event=callback or (lambda event: None),
                initial_state=state,
                score_top=score_prompt,
            )
            for decoder, callback in zip(decoders, callbacks, strict=True)
        ]
        leader = requests[0]
        leader.followers = requests[1:]
        with self._lock:
            if len(self._waiting) >= self.max_waiting and self._running() >= self.max_batch:
                self.counters["rejected"] += 1
                raise EngineFull(
                    f"server busy: {len(self._waiting)} requests are waiting and all {self.max_batch} "
                    "slots are in use; retry later"
                )
            self._waiting.append(leader)
            self.counters["requests"] += len(requests)
            self._lock.notify()
        return requests

    def cancel(self, request: Request) -> None:
        request.cancel()
        with self._lock:
            self._lock.notify()

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._prefilling or self._decoding)

    def run_until_idle(self) -> None:
        """Step until every submitted request has finished (for use without the background thread)."""
        while self.has_work():
            self.step()

    def start(self) -> None:
        """Run the step loop in a background thread (idempotent)."""
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="rwkvkit-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Stop the background thread; unfinished requests are cancelled."""
        with self._lock:
            self._stop = True
            for request in [*self._waiting, *self._prefilling, *self._decoding]:
                for r in (request, *request.followers):
                    r.cancelled = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self.step()  # report the cancellations

    def stats(self) -> dict:
        """Queue length, running sequences, recent tokens/s, counters and the prefix cache's stats."""
        now = time.perf_counter()
        with self._lock:
            while self._recent and now - self._recent[0][0] > 10.0:
                self._recent.popleft()
            recent = sum(n for _, n in self._recent)
            span = (now - self._recent[0][0]) if self._recent else 0.0
            out = {
                "waiting": len(self._waiting),
                "running": self._running(),
                "max_batch": self.max_batch,
                "tokens_per_second": round(recent / span, 2) if span > 0 else 0.0,
                **self.counters,
            }
        if self.cache is not None:
            out["prefix_cache"] = self.cache.stats()
        return out

    # ------------------------------------------------------------------------------------------ steps

    def step(self) -> bool:
        """One scheduling step (see the module docstring). Returns whether there was anything to do."""
        with self._lock:
            self._drop_cancelled()
            self._admit()
            work = bool(self._prefilling or self._decoding)
        if not work:
            return False
        try:
            with torch.inference_mode():
                self._prefill_one_chunk()
                self._decode_step()
        except Exception as e:  # a bug or a device error: fail the running requests, keep serving
            self._fail_all(f"{type(e).__name__}: {e}")
        return True

    def _running(self) -> int:
        return sum(r.slots for r in self._prefilling) + len(self._decoding)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not (self._waiting or self._prefilling or self._decoding):
                    self._lock.wait()
                if self._stop:
                    return
            self.step()

    def _drop_cancelled(self) -> None:
        for queue in (self._waiting, self._prefilling):
            for request in [r for r in queue if r.cancelled]:
                queue.remove(request)
                for r in (request, *request.followers):  # followers wait for their leader's prompt
                    self._finish(r, "cancelled")
        gone = [i for i, r in enumerate(self._decoding) if r.cancelled]
        if gone:
            finished = [(self._decoding[i], self._batch_state.select([i])) for i in gone]
            self._keep_rows([i for i in range(len(self._decoding)) if i not in gone])
            for request, state in finished:
                self._finish(request, "cancelled", state=state)

    def _admit(self) -> None:
        while self._waiting and self._running() + self._waiting[0].slots <= self.max_batch:
            request = self._waiting.popleft()
            request.state = request.initial_state
            if request.score_top is not None:
                request.prompt_logprobs = []
            elif self.cache is not None and request.initial_state is None:
                hit = self.cache.longest_prefix(request.prompt)
                if hit is not None:
                    n, state, logits = hit
                    request.prefilled, request.cached_tokens, request.state = n, n, state
                    request.logits = logits
            self.counters["prompt_tokens"] += len(request.prompt)
            self.counters["cached_prompt_tokens"] += request.cached_tokens
            if request.prefilled >= len(request.prompt):
                self._start_decoding(request)
            else:
                self._prefilling.append(request)

    def _prefill_one_chunk(self) -> None:
        if not self._prefilling:
            return
        request = self._prefilling[0]
        prompt = request.prompt
        caching = self.cache is not None and request.initial_state is None
        block = self.cache.block_size if caching else None  # end chunks at the cache's block boundaries
        start, end = next(prefill_spans(request.prefilled, len(prompt), self.prefill_chunk, block))
        if request.score_top is not None:
            vocab = request.decoder.usable_vocab
            entries, request.logits, request.state = score_prompt(
                self.model, prompt[start:end], request.state, request.logits, request.score_top, vocab
            )  # logits (V,)
            request.prompt_logprobs.extend(entries)
        else:
            request.logits, request.state = prefill(
                self.model, prompt[start:end], request.state, self.prefill_chunk, bf16=self.bf16_prefill
            )  # logits (V,)
        request.prefilled = end
        if caching:  # keep the states at block boundaries and at the prompt's end
            self.cache.insert_prefill_point(prompt, end, request.state, request.logits)
        if end >= len(prompt):
            with self._lock:
                self._prefilling.pop(0)
            self._start_decoding(request)

    def _start_decoding(self, request: Request) -> None:
        followers, request.followers = request.followers, []
        self._join_decoding(request)
        for follower in followers:  # the same prompt: a copy of the leader's state and logits
            if follower.cancelled:
                self._finish(follower, "cancelled")
                continue
            follower.state, follower.logits = request.state.clone(), request.logits
            follower.prefilled, follower.cached_tokens = request.prefilled, request.cached_tokens
            follower.prompt_logprobs = request.prompt_logprobs
            self._join_decoding(follower)

    def _join_decoding(self, request: Request) -> None:
        if request.prompt_logprobs is not None:
            request.on_event(TextEvent("", prompt_logprobs=request.prompt_logprobs))
        with self._lock:
            self._decoding.append(request)
            self._batch_state = (
                request.state.clone()
                if self._batch_state is None
                else RWKVState.concat([self._batch_state, request.state.to(self.model.device)])
            )

    def _keep_rows(self, rows: list[int]) -> None:
        """Keep only these decoding rows (in this order), in the list and in the batched state."""
        self._decoding = [self._decoding[i] for i in rows]
        if not rows:
            self._batch_state = None
        elif self._batch_state is not None and len(rows) != self._batch_state.batch_size:
            self._batch_state = self._batch_state.select(rows)

    def _decode_step(self) -> None:
        if not self._decoding:
            return
        fed_rows, fed_tokens, ending = self._step_decoders()
        with self._lock:
            self.counters["generated_tokens"] += len(fed_tokens)
            self._recent.append((time.perf_counter(), len(fed_tokens)))
        new_state = self._feed(fed_rows, fed_tokens) if fed_rows else None
        finished = []
        for row, (reason, stop) in ending.items():
            if row in fed_rows:
                final = new_state.select([fed_rows.index(row)])
            else:  # its last token was not fed (a stop token, or max_tokens reached)
                final = self._batch_state.select([row])
            finished.append((self._decoding[row], reason, stop, final))
        keep = [i for i, row in enumerate(fed_rows) if row not in ending]
        with self._lock:
            self._decoding = [self._decoding[fed_rows[i]] for i in keep]
            if not keep:
                self._batch_state = None
            else:
                self._batch_state = new_state if len(keep) == len(fed_rows) else new_state.select(keep)
        for request, reason, stop, final in finished:  # after the slots are free: a client may resubmit
            self._finish(request, reason, stop, final)

    def _step_decoders(self) -> tuple[list[int], list[int], dict[int, tuple[str, int | str | None]]]:
        """Step every decoding row's decoder; returns the rows whose new token goes through the model,
        those tokens, and row -> (finish reason, what stopped it) for the rows that end this step."""
        fed_rows, fed_tokens = [], []
        ending: dict[int, tuple[str, int | str | None]] = {}
        sampled = self._sample()
        for row, request in enumerate(self._decoding):
            token = sampled.get(row)
            if isinstance(
                token, RwkvkitError
            ):  # e.g. its bans rule out every token: this request alone fails
                ending[row] = ("error", str(token))
                continue
            decoder = request.decoder
            out = decoder.finish("length") if token is None else decoder.take(token, request.logits)
            scored = decoder.new_logprobs()
            if out.text or scored:
                request.on_event(TextEvent(out.text, scored))
            if out.token is not None:  # also the last token of a stop string: the state covers it
                fed_rows.append(row)
                fed_tokens.append(out.token)
            if out.finish_reason is not None:
                ending[row] = (out.finish_reason, request.decoder.stop)
        return fed_rows, fed_tokens, ending

    def _sample(self) -> dict[int, int | RwkvkitError]:
        """The next token (or the error) of every decoding row that has not reached its max_tokens, sampled
        in batches (``sample_rows``: the same tokens as each request's ``decoder.step`` alone)."""
        rows = [row for row, request in enumerate(self._decoding) if not request.decoder.exhausted]
        if not rows:
            return {}
        requests = [self._decoding[row] for row in rows]
        fed, fed_logits = self._fed
        if len(fed) == len(requests) and all(a is b for a, b in zip(fed, requests, strict=True)):
            logits = fed_logits  # (R, V) the rows of the last model call, in this order: no copy
        else:
            logits = torch.stack([request.logits for request in requests])  # (R, V)
        tokens = sample_rows([self._decoding[row].decoder for row in rows], logits)
        return dict(zip(rows, tokens, strict=True))

    def _feed(self, rows: list[int], tokens: list[int]) -> RWKVState:
        """Run ``tokens`` (one per row of ``rows``) through the model in one batched call; set each row's
        logits and return the new states of those rows (in that order)."""
        state = self._batch_state if len(rows) == len(self._decoding) else self._batch_state.select(rows)
        x = torch.tensor(tokens, dtype=torch.long, device=self.model.device).view(-1, 1)  # (B, 1)
        if self.graphs is not None:  # sampled ids, in range: no check; copies out of the graph's buffers
            with torch.no_grad():
                logits, new_state = self.graphs.step(x, state, check=False)  # logits (B, V)
            last, new_state = logits.clone(), new_state.clone()
        else:
            logits, new_state = self.model(x, state)  # logits (B, 1, V)
            last = logits[:, -1].float()  # (B, V)
        for i, row in enumerate(rows):
            self._decoding[row].logits = last[i]
        self._fed = ([self._decoding[row] for row in rows], last)
        return new_state

    def _finish(
        self, request: Request, reason: str, stop: int | str | None = None, state: RWKVState | None = None
    ) -> None:
        """Report the end of ``request`` (its decoder has shown everything it will)."""
        error = stop if reason == "error" else None
        with self._lock:
            counter = {"stop": "finished", "length": "finished", "error": "failed"}.get(reason, "cancelled")
            self.counters[counter] += 1
        request.on_event(
            FinishEvent(
                reason=reason,
                prompt_tokens=len(request.prompt),
                completion_tokens=len(request.generated),
                cached_tokens=request.cached_tokens,
                text=request.decoder.text,
                tokens=list(request.generated),
                state=state if state is not None else request.state,
                stop=None if error else stop,
                error=error,
                bad_request=error is not None,
                logprobs=request.decoder.logprobs if request.decoder.top_logprobs is not None else None,
                prompt_logprobs=request.prompt_logprobs,
            )
        )

    def _fail_all(self, message: str) -> None:
        with self._lock:
            requests = [*self._prefilling, *self._decoding]
            requests += [f for r in self._prefilling for f in r.followers]
            self._prefilling, self._decoding, self._batch_state = [], [], None
        for request in requests:
            request.on_event(
                FinishEvent(
                    reason="error",
                    prompt_tokens=len(request.prompt),
                    completion_tokens=len(request.generated),
                    cached_tokens=request.cached_tokens,
                    text=request.decoder.text,
                    tokens=list(request.generated),
                    error=message,
                )
            )
