"""Variable-length ("packed") WKV: rows that hold several sequences, the state restarting at each start.

A packed row is documents one after another; ``resets`` (B, T) bool marks the positions where a new
document starts (position 0 always starts from the op's ``state``; ``resets[:, 0]`` changes nothing). Every
document must come out as if it ran alone from ``state``, forward and backward. This is fla's
``cu_seqlens`` in a per-row form: :func:`resets_from_offsets` turns per-row document offsets into it.

Two forms, the second tested against the first:

``run_split`` (the reference): each document of each row runs alone through the op's reference or
recurrent form, a Python loop over documents; the slow ground truth.

``run_chunked`` (the production form): the documents of a row are laid out so that each one begins a
chunk of the op's chunked form (its tokens moved right, the rest of its last chunk filled with steps that
change nothing), every row padded to the same number of chunks; the chunked form then runs once for the
whole batch with a per-chunk flag (``resets`` (B, NC)) that makes a document's first chunk enter from
``state`` instead of the state the chunk before left. The outputs are gathered back to their positions,
the gradients flow through the two gathers. A filler step is neutral: for RWKV-5.2/6/7 w = 0 and
r = k = v = a = b = 0 leave the state unchanged; for RWKV-4 k = -1e38, v = 0 add nothing and only
decay the state (pp += w per step), which is undone on the final state. Each document costs at most one
chunk of filler, so a row of D documents runs at most D - 1 chunks more than unpacked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from rwkvkit.wkv.v4.state import PP_INIT

if TYPE_CHECKING:  # annotations only (dispatch imports this module)
    from rwkvkit.wkv.dispatch import State, WKVOp

__all__ = ["Layout", "check_resets", "plan_layout", "resets_from_offsets", "run_chunked", "run_split"]

# What a filler step feeds an argument (every argument not listed: 0); see the module docstring.
FILLER = {("wkv4", "k"): PP_INIT}


def resets_from_offsets(
    offsets: Sequence[Sequence[int]], T: int, device: torch.device | str | None = None
) -> Tensor:
    """The ``resets`` (B, T) bool of rows whose documents start at ``offsets[b]`` (positions in [0, T),
    e.g. ``[[0, 5, 9], [0]]``; 0 may be left out)."""
    resets = torch.zeros(len(offsets), T, dtype=torch.bool, device=device)
    for b, row in enumerate(offsets):
        for start in row:
            if not 0 <= start < T:
                raise ValueError(f"document offset {start} of row {b} is outside [0, {T})")
            resets[b, start] = True
    return resets


def check_resets(name: str, resets: Tensor, lead: Tensor) -> None:
    """Raise ValueError unless ``resets`` is a bool (B, T) tensor on the lead argument's device."""
    B, T = lead.shape[:2]
    if not isinstance(resets, Tensor) or resets.dtype != torch.bool or tuple(resets.shape) != (B, T):
        got = tuple(resets.shape) if isinstance(resets, Tensor) else type(resets).__name__
        dtype = f" {resets.dtype}" if isinstance(resets, Tensor) else ""
        raise ValueError(f"{name}: resets must be a bool tensor (B, T) = {(B, T)}, got{dtype} {got}")
    if resets.device != lead.device:
        raise ValueError(f"{name}: resets is on {resets.device}, the inputs on {lead.device}")


# ---------------------------------------------------------------------------------------------- reference


def _row_state(op: WKVOp, state: State, b: int) -> State:
    """Row b of ``state`` (None stays None), in the op's state layout."""
    if state is None:
        return None
    if op.name == "wkv4":
        parts = state.unbind(0) if isinstance(state, Tensor) else state
        return tuple(s[b : b + 1] for s in parts)
    return state[b : b + 1]


def _cat_states(op: WKVOp, states: list) -> State:
    """The per-row final states of a form, joined into the batch's."""
    if op.name == "wkv4":
        return tuple(torch.cat(parts, dim=0) for parts in zip(*states, strict=True))
    return torch.cat(states, dim=0)


def _segments(starts_row: Tensor) -> list[tuple[int, int]]:
    """(start, end) of the documents of one row from its (T,) bool starts."""
    T = starts_row.shape[0]
    begin = [0, *(int(t) for t in torch.nonzero(starts_row[1:]).flatten() + 1)]
    return list(zip(begin, [*begin[1:], T], strict=True))


def run_split(
    op: WKVOp, form: Callable[..., tuple], tensors: Sequence[Tensor], state: State, resets: Tensor
) -> tuple:
    """The reference: every document of every row alone through ``form`` (the op's reference or
    recurrent form), each from its row's ``state``. Returns what the form returns for the batch: y and the
    final state (of each row's last document)."""
    per_step = {op.args.index(n) for n in (op.lead, *op.per_step)}
    ys, finals = [], []
    for b in range(resets.shape[0]):
        row_ys, final = [], None
        for start, end in _segments(resets[b]):
            piece = [x[b : b + 1, start:end] if i in per_step else x for i, x in enumerate(tensors)]
            y, final = form(*piece, _row_state(op, state, b))
            row_ys.append(y)
        ys.append(torch.cat(row_ys, dim=1))
        finals.append(final)
    return torch.cat(ys, dim=0), _cat_states(op, finals)


# ---------------------------------------------------------------------------------------------- chunked


class Layout(NamedTuple):
    """Where the tokens of packed rows go in the chunk-aligned layout (see the module docstring)."""

    n: int  # chunk length
    src: Tensor  # (B, NC * n) long: the original position of each laid-out step (T: a filler step)
    dst: Tensor  # (B, T) long: the laid-out position of each original step
    chunk_resets: Tensor  # (B, NC) bool: the chunk begins a document (enters from the initial state)
    tail: Tensor  # (B,) long: filler steps after each row's last token


def plan_layout(resets: Tensor, n: int) -> Layout:
    """The chunk-aligned layout of rows (B, T) whose documents start where ``resets`` is True (and at 0),
    for chunks of n steps: each document begins a chunk. One host sync (the number of chunks)."""
    B, T = resets.shape
    dev = resets.device
    starts = resets.clone()
    starts[:, 0] = True
    seg = torch.cumsum(starts, dim=1) - 1  # (B, T): which document of its row each step belongs to
    n_seg = int(seg[:, -1].max()) + 1
    position = torch.arange(T, device=dev).expand(B, T)
    seg_len = torch.zeros(B, n_seg, dtype=torch.long, device=dev).scatter_add_(1, seg, torch.ones_like(seg))
    seg_chunks = (seg_len + n - 1) // n  # (B, S): 0 for the documents a row does not have
    first_chunk = torch.cumsum(seg_chunks, dim=1) - seg_chunks  # (B, S) exclusive
    seg_start = torch.zeros(B, n_seg, dtype=torch.long, device=dev).scatter_reduce_(
        1, seg, position, reduce="amin", include_self=False
    )  # (B, S): the original position of each document's first step
    dst = first_chunk.gather(1, seg) * n + (position - seg_start.gather(1, seg))  # (B, T)
    NC = int(seg_chunks.sum(1).max())
    src = torch.full((B, NC * n), T, dtype=torch.long, device=dev).scatter_(1, dst, position)
    flags = torch.zeros(B, NC + 1, dtype=torch.bool, device=dev)
    flags.scatter_(1, torch.where(seg_len > 0, first_chunk, NC), True)  # absent documents -> column NC
    return Layout(n, src, dst, flags[:, :NC], NC * n - 1 - dst[:, -1])


def _gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x (B, T, ...) at positions index (B, T') of each row -> (B, T', ...), by one index_select over
    the flattened rows (a copy of whole steps)."""
    B, T = x.shape[:2]
    flat = (index + T * torch.arange(B, device=x.device).unsqueeze(1)).flatten()  # (B * T',)
    return x.reshape(B * T, *x.shape[2:]).index_select(0, flat).view(B, index.shape[1], *x.shape[2:])


class _Move(torch.autograd.Function):
    """x (B, T, ...) -> x at ``take`` (B, T'), positions T of ``take`` reading ``filler``. The move is
    one-to-one, so its backward is a gather too (at ``back``, the inverse map): no scatter-add."""

    @staticmethod
    def forward(ctx, x, take, back, filler):  # type: ignore[override]
        ctx.save_for_backward(back)
        ctx.length = x.shape[1]
        fill = torch.full((x.shape[0], 1, *x.shape[2:]), filler, dtype=x.dtype, device=x.device)
        return _gather_rows(torch.cat((x, fill), dim=1), take)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (back,) = ctx.saved_tensors
        zero = grad.new_zeros(grad.shape[0], 1, *grad.shape[2:])
        return _gather_rows(torch.cat((grad, zero), dim=1), back), None, None, None


def to_layout(x: Tensor, layout: Layout, filler: float = 0.0) -> Tensor:
    """A per-step tensor (B, T, ...) in the chunk-aligned layout (B, NC * n, ...), filler steps = filler."""
    return _Move.apply(x, layout.src, layout.dst, filler)


def from_layout(y: Tensor, layout: Layout) -> Tensor:
    """Outputs (B, NC * n, ...) in the layout back at their original positions (B, T, ...)."""
    return _Move.apply(y, layout.dst, layout.src, 0.0)


def run_chunked(op: WKVOp, tensors: Sequence[Tensor], state: State, resets: Tensor, chunk_size: int) -> tuple:
    """The op's chunked form over packed rows (see the module docstring): y (B, T, ...) and the final
    state (of each row's last document), equal to :func:`run_split`."""
    lead = tensors[op.args.index(op.lead)]
    n = op.chunk_length(lead.shape[1], chunk_size, tensors)
    layout = plan_layout(resets, n)
    per_step = (op.lead, *op.per_step)
    laid = [
        to_layout(x, layout, FILLER.get((op.name, name), 0.0)) if name in per_step else x
        for name, x in zip(op.args, tensors, strict=True)
    ]
    y, final = op.chunked(*laid, state, chunk_size=n, resets=layout.chunk_resets)
    if op.name == "wkv4":  # the filler steps after the last token only decayed the state: undo that
        aa, bb, pp = final
        w = tensors[op.args.index("w")]
        final = (aa, bb, pp - layout.tail.unsqueeze(1).to(pp.dtype) * w.to(pp.dtype))
    return from_layout(y, layout), final
