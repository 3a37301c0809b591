"""Constrained JSON decoding libraries on the RWKV World vocab: setup, schema compile and per-token cost.

Measures each candidate that can be imported (llguidance, xgrammar, outlines-core, lm-format-enforcer)
and says which cannot; the "rwkvkit" row is rwkvkit.infer.constrained (on llguidance), whose step
includes turning the bitmask into the (V,) bool tensor the engine uses. For each one, on the 65536-id
World vocab:

* vocab: building the library's tokenizer object from the raw token bytes (done once per process);
* compile: turning a typical JSON schema (a string, an integer, an enum, an array of numbers and a nested
  object) into the library's grammar / index (done once per request);
* 1st mask / next seq: a new matcher (one per sequence) and its first mask, for the first sequence
  (libraries that compile lazily pay here) and the median of the later ones;
* step: per generated token, computing the allowed-token mask and advancing by the token, over a fixed
  JSON document of ~60 World tokens (its greedy tokenization); median and p90 in microseconds.

Each candidate is checked as it is measured: every token of the document must be allowed by the mask,
end of text (id 0) must be refused before the end and allowed after it. A candidate that fails a check
is reported with the reason instead of numbers.

Each candidate usually lives in its own environment; put its site-packages on PYTHONPATH, e.g.::

    PYTHONPATH=$PWD:/tmp/cd-llg/lib/python3.11/site-packages python benchmarks/bench_constrained.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from rwkvkit.tokenizer import WorldTokenizer

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "color": {"enum": ["red", "green", "blue"]},
        "scores": {"type": "array", "items": {"type": "number"}},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "color", "scores", "address"],
    "additionalProperties": False,
}
ASCII_DOCUMENT = {
    "name": "Alice Miller",
    "age": 42,
    "color": "green",
    "scores": [1.5, -2.25, 3e2, 7],
    "address": {"city": "San Francisco", "zip": "94110"},
}
DOCUMENT = {
    "name": "Alice Müller 李雷",
    "age": 42,
    "color": "green",
    "scores": [1.5, -2.25, 3e2, 7],
    "address": {"city": "San Francisco 🌉", "zip": "94110"},
}


class Unsupported(Exception):
    """The candidate cannot do what is measured (the message says why)."""


# ---- candidates: build(token_bytes) -> vocab object; compile(vocab, schema) -> grammar;
# ---- matcher(grammar) -> object with step(token) (mask + check + advance) and allows_eos() ----


def _llguidance(token_bytes: list[bytes]):
    import llguidance as llg

    tokens = list(token_bytes)
    tokens[0] = b"\xff<|endoftext|>"  # llguidance marks special tokens with a leading 0xff byte
    tok = WorldTokenizer()

    class _Source:
        eos_token_id, bos_token_id, special_token_ids = 0, None, [0]

        def __init__(self) -> None:
            self.tokens = tokens

        def __call__(self, data: bytes) -> list[int]:
            return tok.encode_bytes(data)

    def build():
        return llg.LLTokenizer(llg.TokenizerWrapper(_Source()))

    def compile_(lt, schema):
        grammar = llg.LLMatcher.grammar_from_json_schema(schema)
        err = llg.LLMatcher.validate_grammar(grammar, lt)
        if err:
            raise Unsupported(err)
        return lt, grammar

    class Matcher:
        def __init__(self, compiled):
            self.m = llg.LLMatcher(*compiled)
            self.mask = np.zeros((len(tokens) + 31) // 32, dtype=np.int32)  # (V/32,) bits

        def step(self, token: int) -> bool:
            self.m.unsafe_compute_mask_ptr(self.mask.ctypes.data, self.mask.nbytes)
            ok = bool((self.mask[token >> 5] >> (token & 31)) & 1)
            return ok and self.m.consume_token(token)

        def allows_eos(self) -> bool:
            self.m.unsafe_compute_mask_ptr(self.mask.ctypes.data, self.mask.nbytes)
            return bool(self.mask[0] & 1)

    return "llguidance", llg.__version__, build, compile_, Matcher


def _xgrammar(token_bytes: list[bytes]):
    import importlib.metadata

    import xgrammar as xgr

    vocab = len(token_bytes)

    def build():
        info = xgr.TokenizerInfo(list(token_bytes), xgr.VocabType.RAW, vocab_size=vocab, stop_token_ids=[0])
        return xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)

    def compile_(compiler, schema):
        return compiler.compile_json_schema(json.dumps(schema))

    class Matcher:
        def __init__(self, compiled):
            self.m = xgr.GrammarMatcher(compiled)
            self.mask = xgr.allocate_token_bitmask(1, vocab)  # (1, V/32) int32 bits

        def step(self, token: int) -> bool:
            self.m.fill_next_token_bitmask(self.mask)
            ok = bool((int(self.mask[0, token >> 5]) >> (token & 31)) & 1)
            return ok and self.m.accept_token(token)

        def allows_eos(self) -> bool:
            self.m.fill_next_token_bitmask(self.mask)
            return bool(int(self.mask[0, 0]) & 1)

    return "xgrammar", importlib.metadata.version("xgrammar"), build, compile_, Matcher


def _outlines_core(token_bytes: list[bytes]):
    import importlib.metadata

    import outlines_core as oc
    from outlines_core.json_schema import build_regex_from_schema

    vocab = len(token_bytes)

    def build():
        by_bytes: dict[bytes, list[int]] = {}
        for tid, data in enumerate(token_bytes):
            if tid != 0 and data:
                by_bytes.setdefault(data, []).append(tid)
        return oc.Vocabulary(0, by_bytes)

    def compile_(voc, schema):
        return oc.Index(build_regex_from_schema(json.dumps(schema)), voc)

    class Matcher:
        def __init__(self, index):
            self.g = oc.Guide(index)
            self.mask = np.zeros((vocab + 31) // 32, dtype=np.int32)  # (V/32,) bits

        def step(self, token: int) -> bool:
            self.mask[:] = 0
            self.g.write_mask_into(self.mask.ctypes.data, self.mask.size, 4)
            ok = bool((self.mask[token >> 5] >> (token & 31)) & 1)
            if ok:
                self.g.advance(token, return_tokens=False)
            return ok

        def allows_eos(self) -> bool:
            self.mask[:] = 0
            self.g.write_mask_into(self.mask.ctypes.data, self.mask.size, 4)
            return bool(self.mask[0] & 1)

    return "outlines-core", importlib.metadata.version("outlines-core"), build, compile_, Matcher


def _lm_format_enforcer(token_bytes: list[bytes]):
    import importlib.metadata

    from lmformatenforcer import JsonSchemaParser, TokenEnforcer, TokenEnforcerTokenizerData

    vocab = len(token_bytes)
    world = WorldTokenizer()
    regular = []  # it takes tokens as str: a token that is not valid UTF-8 on its own cannot be given
    for tid in range(1, vocab):
        try:
            regular.append((tid, token_bytes[tid].decode("utf-8"), False))
        except UnicodeDecodeError:
            pass

    def build():
        return TokenEnforcerTokenizerData(regular, world.decode, 0, False, vocab)

    def compile_(data, schema):
        return data, schema

    class Matcher:
        def __init__(self, compiled):
            self.e = TokenEnforcer(compiled[0], JsonSchemaParser(compiled[1]))
            self.seq: list[int] = []

        def step(self, token: int) -> bool:
            allowed = self.e.get_allowed_tokens(self.seq)
            self.seq.append(token)
            return token in set(allowed.allowed_tokens)

        def allows_eos(self) -> bool:
            return 0 in self.e.get_allowed_tokens(self.seq).allowed_tokens

    return "lm-format-enforcer", importlib.metadata.version("lm-format-enforcer"), build, compile_, Matcher


def _rwkvkit(token_bytes: list[bytes]):
    """rwkvkit.infer.constrained itself (llguidance underneath): the (V,) bool mask the engine gets."""
    import importlib.metadata

    from rwkvkit.infer import constrained

    world = WorldTokenizer()

    def build():
        constrained._LLTOKENIZERS.clear()
        return constrained._lltokenizer(constrained._llguidance(), world)

    def compile_(_lltok, schema):
        return constrained.compile_json_constraint(world, schema, vocab_size=len(token_bytes))

    class Matcher:
        def __init__(self, grammar):
            self.m = grammar.new_matcher()

        def step(self, token: int) -> bool:
            ok = bool(self.m.allowed_mask()[token])
            if ok:
                self.m.advance(token)
            return ok

        def allows_eos(self) -> bool:
            return bool(self.m.allowed_mask()[0])

    return "rwkvkit mask (llg)", importlib.metadata.version("llguidance"), build, compile_, Matcher


CANDIDATES: dict[str, Callable] = {
    "llguidance": _llguidance,
    "xgrammar": _xgrammar,
    "outlines-core": _outlines_core,
    "lm-format-enforcer": _lm_format_enforcer,
    "rwkvkit": _rwkvkit,
}
IMPORT_NAMES = {
    "llguidance": "llguidance",
    "xgrammar": "xgrammar",
    "outlines-core": "outlines_core",
    "lm-format-enforcer": "lmformatenforcer",
    "rwkvkit": "llguidance",
}


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def measure(make: Callable, token_bytes: list[bytes], ids: list[int], repeats: int) -> dict[str, Any]:
    """One candidate's numbers (or the reason it failed)."""
    name, version, build, compile_, matcher_cls = make(token_bytes)
    t0 = time.perf_counter()
    vocab_obj = build()
    vocab_ms = _ms(t0)
    t0 = time.perf_counter()
    compiled = compile_(vocab_obj, SCHEMA)
    compile_ms = _ms(t0)
    compiled_any = compile_(vocab_obj, {"type": "object"})  # json_object mode must compile too
    steps: list[float] = []
    first_ms = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        m = matcher_cls(compiled)
        if m.allows_eos():
            raise Unsupported("end of text allowed before the JSON starts")
        first_ms.append(_ms(t0))
        for pos, token in enumerate(ids):
            t0 = time.perf_counter_ns()
            ok = m.step(token)
            steps.append((time.perf_counter_ns() - t0) / 1e3)
            if not ok:
                raise Unsupported(f"refused token {pos} ({token}) of the document")
        if not m.allows_eos():
            raise Unsupported("end of text refused after the complete JSON")
    del compiled_any
    steps.sort()
    return {
        "name": name,
        "version": version,
        "vocab_ms": vocab_ms,
        "compile_ms": compile_ms,
        "first_ms": first_ms[0],
        "later_first_ms": statistics.median(first_ms[1:]) if len(first_ms) > 1 else float("nan"),
        "median_us": statistics.median(steps),
        "p90_us": steps[int(0.9 * (len(steps) - 1))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only", nargs="*", choices=list(CANDIDATES), help="measure only these candidates (default: all)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="passes over the document (default 5)")
    parser.add_argument(
        "--indent", type=int, default=None, help="json.dumps indent of the document (default: one line)"
    )
    parser.add_argument(
        "--ascii",
        action="store_true",
        help="an ASCII-only document (no CJK / emoji), for libraries that cannot take partial-UTF-8 tokens",
    )
    args = parser.parse_args()

    tok = WorldTokenizer()
    token_bytes = [tok.token_bytes(i) for i in range(tok.vocab_size)]  # (65536,) raw bytes, b"" for id 0
    text = json.dumps(ASCII_DOCUMENT if args.ascii else DOCUMENT, ensure_ascii=False, indent=args.indent)
    ids = tok.encode(text)
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}  cpus: {os.cpu_count()}")
    print(f"vocab: {len(token_bytes)} World tokens; document: {len(text)} chars, {len(ids)} tokens")
    print(
        f"{'library':<20} {'version':<10} {'vocab ms':>9} {'compile ms':>11} {'1st mask ms':>12} "
        f"{'next seq ms':>12} {'step med us':>12} {'p90 us':>9}"
    )
    for key in args.only or list(CANDIDATES):
        try:
            __import__(IMPORT_NAMES[key])
        except ImportError as exc:
            print(f"{key:<20} not importable ({exc})")
            continue
        try:
            r = measure(CANDIDATES[key], token_bytes, ids, args.repeats)
        except Exception as exc:  # noqa: BLE001 - a benchmark reports any failure of a candidate
            print(f"{key:<20} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            continue
        print(
            f"{r['name']:<20} {r['version']:<10} {r['vocab_ms']:>9.0f} {r['compile_ms']:>11.1f} "
            f"{r['first_ms']:>12.2f} {r['later_first_ms']:>12.2f} {r['median_us']:>12.1f} {r['p90_us']:>9.1f}"
        )


if __name__ == "__main__":
    main()
