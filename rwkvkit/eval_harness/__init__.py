"""The lm-evaluation-harness model ``rwkvkit``: rwkvkit's own RWKV models in lm-eval, without transformers.

Importing this module registers the model with ``lm_eval.api.registry.register_model("rwkvkit")``; it needs
the ``lm_eval`` package (``import rwkvkit`` never imports it). lm-eval 0.4.13 knows only the models
registered when its command line runs, so the command line is this module's::

    python -m rwkvkit.eval_harness --model rwkvkit --model_args pretrained=M.pth --tasks lambada_openai \\
        --device cpu --batch_size 4

(the arguments are lm-eval's own, passed through to its ``lm_eval`` command line). From Python::

    import lm_eval, rwkvkit.eval_harness
    lm_eval.simple_evaluate(model="rwkvkit", model_args="pretrained=M.pth,dtype=bf16", tasks=[...])

Model arguments: ``pretrained`` (a .pth / .safetensors checkpoint or a Hugging Face folder, read by
rwkvkit's loader; or an rwkvkit model object from Python), ``tokenizer`` (as ``--tokenizer`` of the
``rwkvkit`` commands; by default the folder's own, else the built-in one of the vocabulary size), ``dtype``
(fp32 / bf16 / fp16, or float32 / bfloat16 / float16; "auto" is fp32), ``device`` (default: cuda when
available, else cpu), ``batch_size`` (log-likelihood requests scored together; "auto" is 1),
``chunk_len`` (the most positions one model call reads; the state carries between calls),
``max_gen_toks`` (default 256).

What each request computes:

* ``loglikelihood``: the summed log-softmax of the continuation's tokens given the context (and whether
  each is the argmax), by :mod:`rwkvkit.evaluate`; an empty context is the end-of-text id 0 (lm-eval's
  prefix token). Continuations of the same context (the choices of a multiple-choice question) read the
  context once and go on from copies of its state, ``batch_size`` at a time
  (:func:`~rwkvkit.evaluate.score_continuations`); the other requests run ``batch_size`` at a time,
  longest first, right-padded (:func:`~rwkvkit.evaluate.score_tokens`).
* ``loglikelihood_rolling``: the whole text's log-likelihood after the end-of-text id 0, in one pass
  read in chunks with the state carried (RWKV has no context window, so nothing is cut into windows):
  the same number ``rwkvkit eval`` reports as loss times tokens.
* ``generate_until``: :func:`rwkvkit.infer.generate_text` from the context's tokens (the end-of-text id
  for an empty one), greedy unless the request's ``do_sample`` / ``temperature`` say otherwise
  (``top_p``, ``top_k``, ``seed`` too), ending at the end-of-text token, at ``max_gen_toks``, or before
  the first of the ``until`` strings (which is not returned).
* ``apply_chat_template`` (``--apply_chat_template``): the World chat format of
  :mod:`rwkvkit.infer.chat_format`.
"""

from __future__ import annotations

from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs
from tqdm import tqdm

from rwkvkit.checkpoint import folder_tokenizer
from rwkvkit.errors import RwkvkitError
from rwkvkit.evaluate import DEFAULT_CHUNK_LEN, score_continuations, score_tokens
from rwkvkit.infer.chat_format import ASSISTANT_PROMPT, TURN_SEPARATOR, format_conversation
from rwkvkit.infer.generate import generate_text
from rwkvkit.infer.sampling import SamplingParams
from rwkvkit.models import load_model
from rwkvkit.tokenizer import default_tokenizer, load_tokenizer

DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "auto": "fp32"}
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_MAX_GEN_TOKS = 256
GEN_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k", "seed"}


def _batch_size(value: int | str) -> int:
    if isinstance(value, str) and value.startswith("auto"):
        return 1
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise RwkvkitError(f"batch_size must be a positive integer or 'auto', got {value!r}") from None
    if size < 1:
        raise RwkvkitError(f"batch_size must be a positive integer or 'auto', got {value!r}")
    return size


def load_for_eval(pretrained: str, tokenizer: str | None, device: str | None, dtype: str) -> tuple[Any, Any]:
    """(model, tokenizer) as the ``rwkvkit`` commands load them: any checkpoint or folder
    (:func:`rwkvkit.models.load_model`), the tokenizer a folder ships, else the vocabulary's built-in one."""
    name = DTYPE_NAMES.get(str(dtype), str(dtype))
    if name not in TORCH_DTYPES:
        raise RwkvkitError(
            f"dtype must be one of fp32, bf16, fp16 (or float32, bfloat16, float16), got {dtype}"
        )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(pretrained, device=torch.device(device), dtype=TORCH_DTYPES[name])
    shipped = folder_tokenizer(pretrained)
    return model, load_tokenizer(tokenizer or shipped or default_tokenizer(model.config.vocab_size))


@register_model("rwkvkit")
class RwkvkitLM(TemplateLM):
    """An rwkvkit RWKV model as an lm-eval ``LM`` (see the module docstring)."""

    def __init__(
        self,
        pretrained: Any,
        tokenizer: Any = None,
        device: str | None = None,
        dtype: str = "fp32",
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        chunk_len: int = DEFAULT_CHUNK_LEN,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
    ) -> None:
        super().__init__()
        if isinstance(pretrained, str):
            self.model, self.rwkv_tokenizer = load_for_eval(pretrained, tokenizer, device, dtype)
        else:  # a model object; tokenizer: a tokenizer object or a name for load_tokenizer
            self.model = pretrained
            if tokenizer is None or isinstance(tokenizer, str):
                tokenizer = load_tokenizer(tokenizer or default_tokenizer(pretrained.config.vocab_size))
            self.rwkv_tokenizer = tokenizer
        self.model.eval()
        self._device = self.model.device
        self.batch_size = _batch_size(batch_size)
        self.chunk_len = int(chunk_len)
        self.max_gen_toks = int(max_gen_toks)

    # ------------------------------------------------------------------------------- tokens

    @property
    def eot_token_id(self) -> int:
        return self.rwkv_tokenizer.eot_id

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.rwkv_tokenizer, "name", type(self.rwkv_tokenizer).__name__))

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """The text's ids (RWKV adds no special tokens, whatever ``add_special_tokens`` says)."""
        return self.rwkv_tokenizer.encode(string) if string else []

    def tok_decode(self, tokens: list[int]) -> str:
        return self.rwkv_tokenizer.decode(tokens)

    # ------------------------------------------------------------------------------- log-likelihoods

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str], list[int], list[int]]],
        disable_tqdm: bool = False,
        **kwargs,
    ) -> list[tuple[float, bool]]:
        """(log-likelihood, is_greedy) of each (key, context ids, continuation ids): continuations that
        share their context (the choices of one question) read it once, the others run in batches."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (_, context, continuation) in enumerate(requests):
            if continuation:
                groups.setdefault(tuple(context), []).append(i)
            else:
                results[i] = (0.0, True)  # nothing to score
        singles = sorted(
            (g[0] for g in groups.values() if len(g) == 1),
            key=lambda i: -(len(requests[i][1]) + len(requests[i][2])),  # longest first: less padding
        )
        batches = [("", singles[k : k + self.batch_size]) for k in range(0, len(singles), self.batch_size)]
        for context, group in groups.items():
            if len(group) > 1:
                batches += [
                    (context, group[k : k + self.batch_size]) for k in range(0, len(group), self.batch_size)
                ]
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="rwkvkit loglikelihood")
        for context, batch in batches:
            for i, answer in zip(batch, self._score_batch(requests, context, batch), strict=True):
                results[i] = answer
                self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            bar.update(len(batch))
        bar.close()
        return results  # type: ignore[return-value]

    def _score_batch(self, requests: list, context: tuple[int, ...] | str, batch: list[int]) -> list:
        """The answers of one batch: continuations of the shared ``context``, or ("") whole requests."""
        if context:
            return score_continuations(
                self.model, list(context), [requests[i][2] for i in batch], self.chunk_len
            )
        sequences = [requests[i][1] + requests[i][2] for i in batch]
        return score_tokens(self.model, sequences, [len(requests[i][2]) for i in batch], self.chunk_len)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        for request in tqdm(requests, disable=disable_tqdm or self.rank != 0, desc="rwkvkit rolling"):
            (text,) = request.args
            ids = self.tok_encode(text)
            if ids:
                sequence = [self.prefix_token_id, *ids]
                value = score_tokens(self.model, [sequence], [len(ids)], self.chunk_len)[0][0]
            else:
                value = 0.0
            results.append(value)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), value)
        return results

    # ------------------------------------------------------------------------------- generation

    def sampling(self, gen_kwargs: dict) -> tuple[SamplingParams, list[str], int]:
        """The sampling parameters, stop strings and token budget of one request's ``gen_kwargs``."""
        unknown = sorted(set(gen_kwargs) - GEN_KWARGS - {"max_new_tokens", "max_tokens"})
        if unknown:
            raise RwkvkitError(f"gen_kwargs {unknown} are not supported (supported: {sorted(GEN_KWARGS)})")
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        temperature = float(kwargs["temperature"]) if kwargs["do_sample"] else 0.0
        params = SamplingParams(
            temperature=temperature,
            top_p=float(kwargs.get("top_p", 1.0)),
            top_k=int(kwargs.get("top_k", 0)),
            seed=kwargs.get("seed"),
        )
        until = [s for s in kwargs["until"] if s]
        return params, until, int(kwargs["max_gen_toks"])

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results = []
        for request in tqdm(requests, disable=disable_tqdm or self.rank != 0, desc="rwkvkit generate"):
            context, gen_kwargs = request.args
            params, until, max_tokens = self.sampling(dict(gen_kwargs))
            prompt = self.tok_encode(context) or [self.eot_token_id]
            out = generate_text(
                self.model,
                self.rwkv_tokenizer,
                prompt,
                max_tokens=max_tokens,
                stop_strings=until,
                sampling=params,
            )
            results.append(out.text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), out.text)
        return results

    # ------------------------------------------------------------------------------- chat

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The World chat prompt of the messages (without ``Assistant:`` unless ``add_generation_prompt``)."""
        prompt = format_conversation((m["role"], m["content"]) for m in chat_history)
        return prompt if add_generation_prompt else prompt.removesuffix(TURN_SEPARATOR + ASSISTANT_PROMPT)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return "rwkv-world" if chat_template else None


def main() -> int:
    """lm-eval's own command line, with the ``rwkvkit`` model registered (a RwkvkitError, such as a missing
    checkpoint, is one line ``error: ...`` and exit status 2)."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    try:
        cli_evaluate()
    except RwkvkitError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0
