"""Tests for state files (rwkvkit.state_io) and the prefix-state cache (rwkvkit.infer.cache).

Expected values come from independent facts: the model run on the whole sequence from scratch, token
counts seen by a forward hook, byte sizes computed from shapes, and a brute-force longest-prefix search.
"""

from __future__ import annotations

import random
import threading

import pytest
import torch
from checkpoints import random_state_dict
from safetensors.torch import save_file

from rwkvkit.config import ModelConfig
from rwkvkit.errors import RwkvkitError
from rwkvkit.infer.cache import PrefixCache, prefill_with_cache
from rwkvkit.models import model_from_state_dict
from rwkvkit.state import RWKVState
from rwkvkit.state_io import load_state, model_fingerprint, save_state

VOCAB = 97
PROMPT = [5, 17, 3, 88, 41, 0, 62, 9, 9, 30, 71, 2, 45]  # 13 tokens
MORE = [11, 23, 56, 7, 90, 14, 38, 66, 1, 19]  # 10 tokens
VERSION_KWARGS = {
    "7": dict(n_layer=2, n_embd=64, head_size=16, vocab_size=VOCAB),
    "7-time-state": dict(n_layer=2, n_embd=64, head_size=16, vocab_size=VOCAB, time_state=True),
    "4": dict(n_layer=2, n_embd=64, vocab_size=VOCAB),
}


def make_model(name: str, seed: int = 1, dtype: torch.dtype = torch.float32, **overrides):
    version = name.split("-")[0]
    kwargs = {**VERSION_KWARGS[name], **overrides, "seed": seed}
    return model_from_state_dict(random_state_dict(version, **kwargs), dtype=dtype)


@pytest.fixture(scope="module", params=["7", "4"])
def model(request):
    return make_model(request.param)


@torch.no_grad()
def from_scratch(model, tokens: list[int]) -> tuple[torch.Tensor, RWKVState]:
    """The whole sequence in one call from a fresh state: (last logits (V,), state)."""
    logits, state = model(torch.tensor([tokens]))
    return logits[0, -1], state


def assert_states_equal(a: RWKVState, b: RWKVState) -> None:
    for name in ("att_shift", "wkv", "ffn_shift"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def assert_states_close(a: RWKVState, b: RWKVState, tol: float = 1e-5) -> None:
    for name in ("att_shift", "wkv", "ffn_shift"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=tol, rtol=tol, msg=name)


class TokenCounter:
    """Counts model calls and the tokens they run (a forward pre-hook; remove() when done)."""

    def __init__(self, model):
        self.calls = 0
        self.tokens = 0
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.calls += 1
        self.tokens += args[0].shape[1]

    def remove(self) -> None:
        self.handle.remove()


# ------------------------------------------------------------------------------------------- state files


def test_round_trip_single_and_batched(model, tmp_path):
    _, state = from_scratch(model, PROMPT)
    for batch in (state, RWKVState.concat([state, model.initial_state(1)])):  # B = 1, then B = 2
        path = tmp_path / f"state{batch.batch_size}.safetensors"
        save_state(batch, path, model)
        loaded = load_state(path, model)
        L, B, C = model.config.n_layer, batch.batch_size, model.config.n_embd
        wkv_shape = (L, B, 3, C) if model.config.version == "4" else (L, B, 4, 16, 16)
        assert tuple(loaded.att_shift.shape) == tuple(loaded.ffn_shift.shape) == (L, B, C)
        assert tuple(loaded.wkv.shape) == wkv_shape
        assert loaded.att_shift.dtype == loaded.ffn_shift.dtype == model.dtype
        assert loaded.wkv.dtype == torch.float32
        assert loaded.wkv.device == loaded.att_shift.device == model.device
        assert_states_equal(loaded, batch)


def test_round_trip_bf16_model(tmp_path):
    model = make_model("7", dtype=torch.bfloat16)
    _, state = from_scratch(model, PROMPT)
    save_state(state, tmp_path / "s.safetensors", model)
    loaded = load_state(tmp_path / "s.safetensors", model)
    assert loaded.att_shift.dtype == loaded.ffn_shift.dtype == torch.bfloat16
    assert loaded.wkv.dtype == torch.float32
    assert_states_equal(loaded, state)
    save_state(state.to(dtype=torch.float32), tmp_path / "fp32.safetensors", model)  # fp32 shifts
    converted = load_state(tmp_path / "fp32.safetensors", model)
    assert converted.att_shift.dtype == converted.ffn_shift.dtype == torch.bfloat16
    assert_states_equal(converted, state)
    with pytest.raises(RwkvkitError, match="bfloat16"):  # the same checkpoint in fp32 is another model
        load_state(tmp_path / "s.safetensors", make_model("7", dtype=torch.float32))


def test_continue_from_loaded_state(model, tmp_path):
    _, state = from_scratch(model, PROMPT)
    save_state(state, tmp_path / "s.safetensors", model)
    loaded = load_state(tmp_path / "s.safetensors", model)
    with torch.no_grad():
        from_loaded, _ = model(torch.tensor([MORE]), loaded)
        from_original, _ = model(torch.tensor([MORE]), state)
    assert torch.equal(from_loaded, from_original)
    expected, _ = from_scratch(model, PROMPT + MORE)
    torch.testing.assert_close(from_loaded[0, -1], expected, atol=1e-5, rtol=1e-5)


def test_refuses_another_models_state(model, tmp_path):
    name = model.config.version
    _, state = from_scratch(model, PROMPT)
    path = tmp_path / "s.safetensors"
    save_state(state, path, model)
    with pytest.raises(RwkvkitError, match="another model .*n_embd 64 != 32"):
        load_state(path, make_model(name, n_embd=32, **({} if name == "4" else {"head_size": 16})))
    with pytest.raises(RwkvkitError, match="another model .*n_layer"):
        load_state(path, make_model(name, n_layer=3))
    other = make_model(name, seed=2)  # same shapes, other weights
    assert other.config == model.config
    with pytest.raises(RwkvkitError, match="same shapes .*fingerprint"):
        load_state(path, other)


def test_refuses_truncated_corrupt_and_foreign_files(tmp_path):
    model = make_model("7")
    _, state = from_scratch(model, PROMPT)
    good = tmp_path / "s.safetensors"
    save_state(state, good, model)
    data = good.read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[:-100])
    with pytest.raises(RwkvkitError, match="truncated or corrupt"):
        load_state(truncated, model)

    damaged = bytearray(data)
    damaged[-50] ^= 0xFF  # a byte inside the ffn_shift data
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(bytes(damaged))
    with pytest.raises(RwkvkitError, match="corrupt: its tensor data does not match"):
        load_state(corrupt, model)

    foreign = tmp_path / "weights.safetensors"
    save_file({"att_shift": torch.randn(2, 1, 64), "wkv": torch.randn(2, 1, 4, 16, 16)}, str(foreign))
    with pytest.raises(RwkvkitError, match="not an rwkvkit state file"):
        load_state(foreign, model)

    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not a state file at all")
    with pytest.raises(RwkvkitError, match="not an rwkvkit state file"):
        load_state(text, model)

    with pytest.raises(RwkvkitError, match="no such file"):
        load_state(tmp_path / "missing.safetensors", model)


def test_save_refuses_a_state_of_another_shape(tmp_path):
    model = make_model("7")
    other_state = make_model("7", n_layer=3).initial_state(1)
    with pytest.raises(RwkvkitError, match="does not fit"):
        save_state(other_state, tmp_path / "s.safetensors", model)
    assert not (tmp_path / "s.safetensors").exists()


def test_fingerprint_identifies_the_weights():
    a, b = make_model("7"), make_model("7")  # built separately from the same weights
    assert model_fingerprint(a) == model_fingerprint(b)
    assert model_fingerprint(a) != model_fingerprint(make_model("7", seed=2))
    assert model_fingerprint(a) != model_fingerprint(make_model("7", dtype=torch.bfloat16))
    tuned = make_model("7-time-state")
    before = model_fingerprint(tuned)
    with torch.no_grad():
        tuned.blocks[1].att.time_state.add_(0.01)  # state tuning changes only time_state
    assert model_fingerprint(tuned) == before  # in place: the cached value stays (documented)
    del tuned._rwkvkit_fingerprint
    assert model_fingerprint(tuned) != before
    # the cache follows a cast: the model holds new tensors
    before = model_fingerprint(b)
    b.to(torch.bfloat16)
    assert model_fingerprint(b) != before
    assert model_fingerprint(b) == model_fingerprint(make_model("7", dtype=torch.bfloat16))


# ------------------------------------------------------------------------------------- prefix cache


@pytest.mark.parametrize("name", ["7", "7-time-state", "4"])
def test_extending_a_cached_prompt_runs_only_the_new_tokens(name):
    model = make_model(name)
    cache = PrefixCache(max_bytes=10**8, block_size=8)
    counter = TokenCounter(model)
    try:
        logits1, state1, n_cached = prefill_with_cache(model, PROMPT, cache, chunk_size=4)
        assert (n_cached, counter.tokens) == (0, len(PROMPT))
        counter.tokens = 0
        logits2, state2, n_cached = prefill_with_cache(model, PROMPT + MORE, cache, chunk_size=4)
        assert (n_cached, counter.tokens) == (len(PROMPT), len(MORE))
    finally:
        counter.remove()
    expected_logits, expected_state = from_scratch(model, PROMPT + MORE)
    torch.testing.assert_close(logits2, expected_logits, atol=1e-5, rtol=1e-5)
    assert_states_close(state2, expected_state)
    expected_logits1, expected_state1 = from_scratch(model, PROMPT)
    torch.testing.assert_close(logits1, expected_logits1, atol=1e-5, rtol=1e-5)
    assert_states_close(state1, expected_state1)


def test_exact_repeat_is_a_full_hit_without_a_model_call(model):
    cache = PrefixCache(max_bytes=10**8, block_size=8)
    prefill_with_cache(model, PROMPT, cache)
    counter = TokenCounter(model)
    try:
        logits, state, n_cached = prefill_with_cache(model, PROMPT, cache)
    finally:
        counter.remove()
    assert n_cached == len(PROMPT) and counter.calls == 0
    expected_logits, expected_state = from_scratch(model, PROMPT)
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)
    assert_states_close(state, expected_state)
    assert cache.stats()["hits"] == 1 and cache.stats()["misses"] == 1


def test_shared_beginning_reuses_the_last_block_boundary(model):
    shared = PROMPT + MORE  # 23 tokens: blocks of 8 end at 8 and 16 inside it
    cache = PrefixCache(max_bytes=10**8, block_size=8)
    prefill_with_cache(model, shared + [4, 4, 4], cache)
    assert cache.stats()["entries"] == 4  # boundaries 8, 16 and 24, and the end (26)
    other = shared + [50, 60]
    counter = TokenCounter(model)
    try:
        logits, state, n_cached = prefill_with_cache(model, other, cache)
    finally:
        counter.remove()
    assert n_cached == 16 and counter.tokens == len(other) - 16
    expected_logits, expected_state = from_scratch(model, other)
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)
    assert_states_close(state, expected_state)


def test_cache_is_bound_to_one_model():
    cache = PrefixCache(max_bytes=10**8)
    prefill_with_cache(make_model("7"), PROMPT, cache)
    with pytest.raises(RwkvkitError, match="another model"):
        prefill_with_cache(make_model("7", seed=2), PROMPT, cache)
    cache.clear()
    prefill_with_cache(make_model("7", seed=2), PROMPT, cache)


# Synthetic entries for the bookkeeping tests: a tiny config; every tensor filled with a marker value.
TINY = ModelConfig(version="7", n_layer=2, n_embd=8, vocab_size=10, n_head=2, head_size=4, dim_ffn=32)
# att_shift + ffn_shift (2 * L * C fp32) + wkv (L * H * N * N fp32) + logits (V fp32), from the shapes
ENTRY_BYTES = 4 * (2 * 2 * 8 + 2 * 2 * 4 * 4 + 10)


def marked(value: float) -> tuple[RWKVState, torch.Tensor]:
    state = RWKVState.zeros(TINY, 1)
    return RWKVState(state.att_shift + value, state.wkv + value, state.ffn_shift + value), torch.full(
        (10,), value
    )


def marker(found) -> float:
    n, state, logits = found
    values = {state.att_shift.flatten()[0].item(), state.wkv.flatten()[-1].item(), logits[3].item()}
    assert len(values) == 1, "the entry's tensors do not belong together"
    return values.pop()


def test_entry_bytes_and_oversized_entry():
    cache = PrefixCache(max_bytes=ENTRY_BYTES)
    assert cache.insert([1, 2], *marked(1.0)) is True
    assert cache.stats()["bytes"] == ENTRY_BYTES
    small = PrefixCache(max_bytes=ENTRY_BYTES - 1)
    assert small.insert([1, 2], *marked(1.0)) is False
    assert small.stats()["entries"] == 0 and small.stats()["bytes"] == 0
    assert small.longest_prefix([1, 2]) is None


def test_lru_eviction_order():
    cache = PrefixCache(max_bytes=3 * ENTRY_BYTES, block_size=2)
    for i, tokens in enumerate(([1], [2, 2], [3, 3, 3])):
        cache.insert(tokens, *marked(float(i)))
    assert cache.longest_prefix([1, 9]) is not None  # [1] becomes the most recently used
    cache.insert([4], *marked(4.0))  # evicts [2, 2], the least recently used
    assert cache.longest_prefix([2, 2]) is None
    cache.insert([5], *marked(5.0))  # evicts [3, 3, 3]
    assert cache.longest_prefix([3, 3, 3]) is None
    assert marker(cache.longest_prefix([1])) == 0.0
    assert marker(cache.longest_prefix([4])) == 4.0
    assert marker(cache.longest_prefix([5])) == 5.0
    stats = cache.stats()
    assert stats["entries"] == 3 and stats["evictions"] == 2 and stats["bytes"] == 3 * ENTRY_BYTES
    cache.insert([5], *marked(6.0))  # replacing an entry neither grows the cache nor evicts
    assert cache.stats()["entries"] == 3 and cache.stats()["evictions"] == 2
    assert marker(cache.longest_prefix([5, 5])) == 6.0


def test_hit_and_miss_counters():
    cache = PrefixCache(max_bytes=10 * ENTRY_BYTES)
    assert cache.stats()["hit_rate"] == 0.0
    cache.insert([1, 2, 3], *marked(1.0))
    assert cache.longest_prefix([1, 2, 3, 4]) is not None
    assert cache.longest_prefix([1, 2]) is None  # shorter than every entry
    assert cache.longest_prefix([7]) is None
    assert cache.longest_prefix([1, 2, 3]) is not None
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["hit_rate"]) == (2, 2, 0.5)
    assert stats["max_bytes"] == 10 * ENTRY_BYTES
    cache.clear()
    assert cache.stats() == dict(
        entries=0, bytes=0, max_bytes=10 * ENTRY_BYTES, hits=0, misses=0, hit_rate=0.0, evictions=0
    )


def test_entries_cannot_be_mutated_by_callers():
    cache = PrefixCache(max_bytes=10 * ENTRY_BYTES)
    state, logits = marked(1.0)
    cache.insert([1, 2], state, logits)
    state.wkv.fill_(99.0)  # the caller's tensors after insert
    logits.fill_(99.0)
    found = cache.longest_prefix([1, 2])
    assert marker(found) == 1.0
    found[1].att_shift.fill_(42.0)  # the tensors a lookup returned
    found[1].wkv.fill_(42.0)
    found[2].fill_(42.0)
    assert marker(cache.longest_prefix([1, 2])) == 1.0


def test_longest_prefix_matches_brute_force():
    rng = random.Random(0)
    for block_size in (1, 3, 4):
        cache = PrefixCache(max_bytes=10**9, block_size=block_size)
        inserted: dict[tuple[int, ...], float] = {}
        for i in range(60):
            tokens = tuple(rng.randrange(3) for _ in range(rng.randint(1, 12)))
            cache.insert(list(tokens), *marked(float(i)))
            inserted[tokens] = float(i)
        for _ in range(300):
            query = tuple(rng.randrange(3) for _ in range(rng.randint(1, 14)))
            prefixes = [t for t in inserted if query[: len(t)] == t]
            found = cache.longest_prefix(torch.tensor(query))
            if not prefixes:
                assert found is None
            else:
                best = max(prefixes, key=len)
                assert found[0] == len(best) and marker(found) == inserted[best]


def test_concurrent_use_keeps_the_cache_consistent():
    n_threads, per_thread = 8, 200
    cache = PrefixCache(max_bytes=20 * ENTRY_BYTES, block_size=2)
    errors: list[str] = []

    def value_of(tokens: tuple[int, ...]) -> float:  # every prefix has its own marker value
        return float(sum(t * 7**i for i, t in enumerate(tokens)) * 10 + len(tokens))

    def work(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(per_thread):
                tokens = tuple(rng.randrange(4) for _ in range(rng.randint(1, 6)))
                if rng.random() < 0.5:
                    cache.insert(tokens, *marked(value_of(tokens)))
                else:
                    found = cache.longest_prefix(tokens)
                    if found is not None and marker(found) != value_of(tokens[: found[0]]):
                        errors.append(f"{tokens}: wrong entry")
                    cache.stats()
        except Exception as e:  # an exception in a thread would otherwise go unnoticed
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    stats = cache.stats()
    assert stats["bytes"] == stats["entries"] * ENTRY_BYTES <= 20 * ENTRY_BYTES
    assert stats["entries"] == len(cache)
    lookups = stats["hits"] + stats["misses"]
    assert 0 < lookups < n_threads * per_thread


def test_rejects_bad_arguments():
    with pytest.raises(RwkvkitError, match="block_size"):
        PrefixCache(max_bytes=100, block_size=0)
    cache = PrefixCache(max_bytes=10**6)
    with pytest.raises(RwkvkitError, match="empty"):
        cache.insert([], *marked(1.0))
    state, logits = marked(1.0)
    with pytest.raises(RwkvkitError, match="B = 1"):
        cache.insert([1], RWKVState.concat([state, state]), logits)
    with pytest.raises(RwkvkitError, match=r"\(V,\)"):
        cache.insert([1], state, logits.view(1, -1))
