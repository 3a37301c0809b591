"""One-token decode steps replayed from a CUDA graph: :class:`CUDAGraphDecoder`.

On a GPU a decode step of a small batch is a few hundred tiny kernel launches, and the host's launch time,
not the GPU, sets the step time. A CUDA graph records the launches of one step once (for a fixed batch
size, into fixed input and output buffers) and replays them with one call. The step recorded is
:meth:`rwkvkit.models.RWKVModel.decode_step` (the torch path without the host-side token checks, which
would wait on the device); :meth:`CUDAGraphDecoder.step` checks the tokens on the host before copying
them in, so bad ids still get their clear error.

The graph's buffers are reused: the logits and state a step returns are overwritten by the next step
(clone them to keep them). Passing the state a step returned back into the next step is the normal loop.
A graph recorded for B rows also runs fewer: the rows past them are padding. :class:`CUDAGraphPool`
keeps one graph per power-of-two batch size, so a batch that grows and shrinks (the engine's) records
at most log2(max_batch) + 1 graphs.
"""

from __future__ import annotations

import torch

from rwkvkit.errors import RwkvkitError
from rwkvkit.state import RWKVState

__all__ = ["CUDAGraphDecoder", "CUDAGraphPool"]


def _rows(state: RWKVState, n: int) -> RWKVState:
    """The first ``n`` sequences of ``state`` (views; the batch is dimension 1 of every part)."""
    return RWKVState(state.att_shift[:, :n], state.wkv[:, :n], state.ffn_shift[:, :n])


def _copy_state(dst: RWKVState, src: RWKVState) -> None:
    for d, s in ((dst.att_shift, src.att_shift), (dst.wkv, src.wkv), (dst.ffn_shift, src.ffn_shift)):
        if d.data_ptr() != s.data_ptr():
            d.copy_(s)


class CUDAGraphDecoder:
    """Decode steps of ``model`` for ``batch_size`` sequences, captured once in a CUDA graph.

    ``step(tokens, state)`` with tokens (n,) or (n, 1) ids and a state for n <= B sequences returns
    (logits (n, V) float32, new state), the same numbers as ``model(tokens, state)`` (the GPU benchmark
    compares them). Both outputs live in the graph's buffers until the next call.
    """

    def __init__(self, model: torch.nn.Module, batch_size: int, warmup: int = 2):
        device = model.device
        if device.type != "cuda":
            raise RwkvkitError(f"CUDA graphs need a model on a CUDA device, this one is on {device}")
        if batch_size < 1:
            raise RwkvkitError(f"batch_size must be at least 1, got {batch_size}")
        self.model, self.batch_size = model, batch_size
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=device)  # (B, 1)
        self.state_in = model.initial_state(batch_size)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(warmup):  # lazy inits, kernel selection and compilation before recording
                model.decode_step(self.tokens, self.state_in)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            logits, self.state_out = model.decode_step(self.tokens, self.state_in)
        self.logits = logits[:, 0]  # (B, V)

    def step(
        self, tokens: torch.Tensor, state: RWKVState, check: bool = True
    ) -> tuple[torch.Tensor, RWKVState]:
        """One token for each sequence from ``state``: (logits (B, V), new state), in the graph's buffers.
        ``check=False`` skips the token-id check (a host read of the ids) for ids known to be valid, such
        as those sampled on the device from the last step's logits."""
        tokens = tokens.reshape(-1, 1)
        n = tokens.shape[0]
        if not 1 <= n <= self.batch_size:
            raise RwkvkitError(f"this graph decodes 1 to {self.batch_size} sequences, got {n} tokens")
        if check:
            self.model.check_tokens(tokens)
        state.check_compatible(self.model.config, n)
        self.tokens[:n].copy_(tokens)
        _copy_state(_rows(self.state_in, n), state)
        self.graph.replay()
        return self.logits[:n], _rows(self.state_out, n)


class CUDAGraphPool:
    """Graphed decode steps for any batch of 1 to ``max_batch`` sequences: the graph of the smallest power
    of two that holds the batch (recorded on first use), the rows past the batch padding."""

    def __init__(self, model: torch.nn.Module, max_batch: int):
        if model.device.type != "cuda":
            raise RwkvkitError(f"CUDA graphs need a model on a CUDA device, this one is on {model.device}")
        self.model, self.max_batch = model, max_batch
        self.graphs: dict[int, CUDAGraphDecoder] = {}

    def size_for(self, n: int) -> int:
        """The graph size that runs a batch of ``n``: the next power of two, at most max_batch."""
        if not 1 <= n <= self.max_batch:
            raise RwkvkitError(f"this pool decodes 1 to {self.max_batch} sequences, got {n}")
        return min(1 << (n - 1).bit_length(), self.max_batch)

    def step(
        self, tokens: torch.Tensor, state: RWKVState, check: bool = True
    ) -> tuple[torch.Tensor, RWKVState]:
        """As :meth:`CUDAGraphDecoder.step`, for a batch of any size up to max_batch."""
        size = self.size_for(tokens.reshape(-1).shape[0])
        if size not in self.graphs:
            self.graphs[size] = CUDAGraphDecoder(self.model, size)
        return self.graphs[size].step(tokens, state, check)
