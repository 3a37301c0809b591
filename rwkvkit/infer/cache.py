"""Prefix-state cache: reuse the recurrent state after a token prefix instead of prefilling it again.

:class:`PrefixCache` maps token prefixes to (the RWKVState after the prefix (B = 1), the logits after
its last token (V,)); :func:`prefill_with_cache` prefills a prompt from the longest cached prefix and
caches what it computes. The cache never calls a model.

Design. An RWKV state has a fixed size whatever the prefix length (unlike a transformer's KV cache,
which grows with it and can be stored block by block), so every entry is a full copy of the state and
entries can only be kept at a few positions. Entries live at two kinds of positions:

- block boundaries (every ``block_size`` tokens), written by :func:`prefill_with_cache` on the way:
  prompts that share a beginning (a system prompt) but differ afterwards reuse the state at the last
  shared boundary and rerun at most ``block_size - 1`` shared tokens;
- the exact end of each inserted prompt: a later prompt that extends it (the next turn of a chat) or
  repeats it reruns nothing of it.

The index is a trie whose edges are whole blocks of ``block_size`` tokens (dict keys are the token
tuples themselves, so a lookup compares tokens exactly and can never confuse two prefixes, as hashing
alone could). A node holds the entry at its boundary and the entries ending 1 .. block_size - 1 tokens
past it. A lookup walks one dict step per block: O(prompt length), without the per-token nodes of a
token trie. The trade-off is ``block_size``: small blocks reuse more of a shared beginning but store
more full states for one long prompt (a prompt of n tokens adds about n / block_size entries); a
``block_size`` above every prompt length keeps only exact prompt ends.

Bounded by ``max_bytes``, the sum of the ``nbytes`` of the cached tensors (states and logits; the
index itself is not counted); the least recently used entry (inserted, or returned by a lookup) is
evicted first. Entries are cloned on the way in and out: callers cannot modify what the cache holds.
Tensors stay on the device they were given. All methods are thread-safe (one lock).
"""

from __future__ import annotations

import operator
import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch

from rwkvkit.errors import RwkvkitError, check_int
from rwkvkit.infer.generate import DEFAULT_PREFILL_CHUNK, prefill, prefill_spans
from rwkvkit.state import RWKVState
from rwkvkit.state_io import model_fingerprint

DEFAULT_BLOCK_SIZE = 256  # the default prefill chunk: boundary entries fall at chunk ends


def _as_tokens(tokens: Sequence[int] | torch.Tensor) -> tuple[int, ...]:
    """Token ids as a tuple of ints; RwkvkitError for an empty or non-integer sequence."""
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() != 1:
            raise RwkvkitError(f"tokens must be a 1-D sequence of ids, got shape {tuple(tokens.shape)}")
        tokens = tokens.tolist()
    try:
        ids = tuple(operator.index(t) for t in tokens)
    except TypeError:
        raise RwkvkitError("tokens must be integer ids") from None
    if not ids:
        raise RwkvkitError("empty token sequence: a cached prefix has at least one token")
    return ids


class _Entry:
    """One cached prefix: where it sits in the trie, its length, and the cached tensors."""

    __slots__ = ("node", "tail", "n_tokens", "state", "logits", "nbytes")

    def __init__(
        self, node: _Node, tail: tuple[int, ...], n_tokens: int, state: RWKVState, logits: torch.Tensor
    ):
        self.node = node
        self.tail = tail  # the tokens past the node's boundary (empty: the entry is at the boundary)
        self.n_tokens = n_tokens
        self.state = state
        self.logits = logits  # (V,)
        self.nbytes = state.att_shift.nbytes + state.wkv.nbytes + state.ffn_shift.nbytes + logits.nbytes


class _Node:
    """A trie node: the prefix of the blocks on the path from the root (depth * block_size tokens)."""

    __slots__ = ("parent", "edge", "children", "entry", "tails")

    def __init__(self, parent: _Node | None, edge: tuple[int, ...]):
        self.parent = parent
        self.edge = edge  # the block leading here from the parent
        self.children: dict[tuple[int, ...], _Node] = {}
        self.entry: _Entry | None = None  # the prefix ending exactly at this boundary
        self.tails: dict[tuple[int, ...], _Entry] = {}  # prefixes ending 1 .. block_size - 1 tokens later


class PrefixCache:
    """Token prefix -> (state after it (B = 1), logits after its last token (V,)), LRU-bounded in bytes.

    insert(tokens, state, logits) stores a prefix; longest_prefix(tokens) returns the longest cached
    prefix of ``tokens`` as (n_tokens, state, logits), or None. See the module docstring for the design.
    """

    def __init__(self, max_bytes: int, block_size: int = DEFAULT_BLOCK_SIZE):
        self.max_bytes = check_int("prefix cache max_bytes", max_bytes, 0)
        self.block_size = check_int("prefix cache block_size", block_size, 1)
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._root = _Node(None, ())
        self._lru: OrderedDict[_Entry, None] = OrderedDict()  # oldest first
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._model_id: str | None = None

    # ------------------------------------------------------------------------------------------ API

    def insert(self, tokens: Sequence[int] | torch.Tensor, state: RWKVState, logits: torch.Tensor) -> bool:
        """Cache (a copy of) the state after ``tokens`` and the logits (V,) after its last token.

        Replaces an entry for the same tokens. Returns False, storing nothing, when the entry alone is
        bigger than ``max_bytes``; otherwise evicts least recently used entries until it fits.
        """
        ids = _as_tokens(tokens)
        if not isinstance(state, RWKVState) or state.batch_size != 1:
            got = f"batch size {state.batch_size}" if isinstance(state, RWKVState) else type(state).__name__
            raise RwkvkitError(f"the prefix cache holds single-sequence states (B = 1), got {got}")
        if not isinstance(logits, torch.Tensor) or logits.dim() != 1:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise RwkvkitError(f"the prefix cache needs the last position's logits (V,), got {got}")
        state, logits = state.detach().clone(), logits.detach().clone()
        n_blocks = len(ids) // self.block_size
        tail = ids[n_blocks * self.block_size :]
        with self._lock:
            node = self._root
            for b in range(n_blocks):
                block = ids[b * self.block_size : (b + 1) * self.block_size]
                child = node.children.get(block)
                if child is None:
                    child = node.children[block] = _Node(node, block)
                node = child
            entry = _Entry(node, tail, len(ids), state, logits)
            if entry.nbytes > self.max_bytes:
                self._prune(node)
                return False
            old = node.tails.get(tail) if tail else node.entry
            if old is not None:
                del self._lru[old]
                self._bytes -= old.nbytes
            if tail:
                node.tails[tail] = entry
            else:
                node.entry = entry
            self._lru[entry] = None
            self._bytes += entry.nbytes
            while self._bytes > self.max_bytes:
                self._evict(next(iter(self._lru)))
            return True

    def insert_prefill_point(
        self, tokens: Sequence[int], end: int, state: RWKVState, logits: torch.Tensor
    ) -> None:
        """During a prefill of ``tokens`` that has read ``tokens[:end]``: cache the state and logits there
        if ``end`` is a block boundary or the end of ``tokens`` (the positions entries live at)."""
        if end == len(tokens) or end % self.block_size == 0:
            self.insert(tokens[:end], state, logits)

    def longest_prefix(
        self, tokens: Sequence[int] | torch.Tensor
    ) -> tuple[int, RWKVState, torch.Tensor] | None:
        """(n_tokens, state, logits) of the longest cached prefix of ``tokens`` (copies), or None.

        Counts a hit (and marks the entry as recently used) or a miss.
        """
        ids = _as_tokens(tokens)
        bs = self.block_size
        with self._lock:
            best: _Entry | None = None
            node, pos = self._root, 0
            while True:
                for tail, entry in node.tails.items():  # prefixes ending inside the next block
                    end = pos + len(tail)
                    if end <= len(ids) and (best is None or end > best.n_tokens) and ids[pos:end] == tail:
                        best = entry
                node = node.children.get(ids[pos : pos + bs]) if pos + bs <= len(ids) else None
                if node is None:
                    break
                pos += bs
                if node.entry is not None:
                    best = node.entry
            if best is None:
                self._misses += 1
                return None
            self._hits += 1
            self._lru.move_to_end(best)
            n_tokens, state, logits = best.n_tokens, best.state, best.logits
        # Cached tensors are never modified in place, so they can be copied outside the lock.
        return n_tokens, state.clone(), logits.clone()

    def stats(self) -> dict:
        """entries, bytes, max_bytes, hits, misses, hit_rate (hits / lookups, 0.0 before any), evictions."""
        with self._lock:
            lookups = self._hits + self._misses
            return {
                "entries": len(self._lru),
                "bytes": self._bytes,
                "max_bytes": self.max_bytes,
                "hits": self._hits,
                "misses": self._misses,
                "hit_rate": self._hits / lookups if lookups else 0.0,
                "evictions": self._evictions,
            }

    def clear(self) -> None:
        """Drop every entry and reset the counters and the model binding (a fresh cache)."""
        with self._lock:
            self._reset()

    def bind_model(self, model_id: str) -> None:
        """Tie the cache to one model: the first call records ``model_id`` (e.g. a model fingerprint);
        a later call with another id raises RwkvkitError, since cached states only fit their model."""
        with self._lock:
            if self._model_id is None:
                self._model_id = model_id
            elif self._model_id != model_id:
                raise RwkvkitError(
                    "this prefix cache holds states of another model: use one cache per model, or clear() it"
                )

    def __len__(self) -> int:
        with self._lock:
            return len(self._lru)

    # ------------------------------------------------------------------------------------ internals

    def _evict(self, entry: _Entry) -> None:
        """Remove ``entry`` (lock held) and the trie nodes it leaves empty."""
        del self._lru[entry]
        self._bytes -= entry.nbytes
        self._evictions += 1
        node = entry.node
        if entry.tail:
            del node.tails[entry.tail]
        else:
            node.entry = None
        self._prune(node)

    @staticmethod
    def _prune(node: _Node) -> None:
        """Unlink ``node`` and its ancestors while they hold no entry and have no children (lock held)."""
        while node.parent is not None and node.entry is None and not node.tails and not node.children:
            del node.parent.children[node.edge]
            node = node.parent


def prefill_with_cache(
    model, tokens: Sequence[int] | torch.Tensor, cache: PrefixCache, chunk_size: int = DEFAULT_PREFILL_CHUNK
) -> tuple[torch.Tensor, RWKVState, int]:
    """Prefill ``tokens`` (one sequence) starting from the longest prefix found in ``cache``.

    Runs only the tokens after the cached prefix (at most ``chunk_size`` per model call, split at the
    cache's block boundaries: ``prefill_spans``, as the engine does), and caches the state and logits at
    each block boundary passed and at the end. A prompt equal to a cached prefix makes no model call.
    The cache is bound to the model (by ``rwkvkit.state_io.model_fingerprint``): using it with another
    model raises RwkvkitError.

    Returns (logits after the last token, float32 (V,), state after all tokens, number of tokens that
    came from the cache).
    """
    ids = _as_tokens(tokens)
    check_int("chunk_size", chunk_size, 1)
    cache.bind_model(model_fingerprint(model))
    n_cached, state, logits = cache.longest_prefix(ids) or (0, None, None)
    for start, end in prefill_spans(n_cached, len(ids), chunk_size, cache.block_size):
        logits, state = prefill(model, ids[start:end], state, chunk_size)
        cache.insert_prefill_point(ids, end, state, logits)
    return logits, state, n_cached
