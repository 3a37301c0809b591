"""The one entry path of the WKV operators: the op record, which implementation runs, and ``run``.

Every operator (``wkv4``, ``wkv6``, ``wkv7``) is one :class:`WKVOp` record in :mod:`rwkvkit.wkv.ops`
(its argument layout, its three forms, its default chunk size and its rule for "auto") and one call of
:func:`run`, which validates the arguments from the record, resolves ``impl``, checks the chunk size,
switches autocast off and calls the chosen form. The model code never calls an implementation directly.

Implementations (``impl=``):
  "reference"  step by step, written for clarity: the ground truth the other forms are tested against;
  "recurrent"  the op's single-token step kernel (``wkv*_step``, the decode fast path) once per token:
               the production form for short sequences;
  "chunked"    chunk-parallel, pure PyTorch, any device: the production form for long sequences;
  "fla", "triton"
               fused GPU kernels (:data:`FUSED_IMPLEMENTATIONS`): an op's :class:`FusedForm` records, each
               with its own rule for which inputs it runs (a CUDA device, an importable package, dtypes,
               shapes); asked for by name on inputs it cannot run, it raises ValueError saying why;
  "auto"       on a CUDA device, the op's first fused form that can run the inputs (no packed rows, T
               above the recurrent bound); otherwise "recurrent" for T <= the op's bound
               (AUTO_STEP_MAX_T; WKV-4 without gradients: any T, its per-channel step is faster than its
               chunked form there), "chunked" above. Never a fused form on the CPU.

``impl=None`` means the value of the context variable :data:`WKV_IMPL` ("auto" unless set), which
:func:`use_impl` switches for the code running in the current context only: a
``with use_impl("reference"):`` in one thread (or asyncio task) never changes the implementation
another thread's model runs. A model that must run one implementation passes ``impl=`` explicitly.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from rwkvkit.wkv import varlen
from rwkvkit.wkv.common import check_chunk_size, check_tensors, full_precision

__all__ = [
    "AUTO",
    "AUTO_STEP_MAX_T",
    "FUSED_IMPLEMENTATIONS",
    "IMPLEMENTATIONS",
    "FusedForm",
    "WKV_IMPL",
    "WKVOp",
    "get_default_impl",
    "resolve_impl",
    "run",
    "set_default_impl",
    "use_impl",
]

# The portable forms every op has on every device, accepted by `impl=` besides "auto" (None means the
# context's choice, see WKV_IMPL).
IMPLEMENTATIONS: tuple[str, ...] = ("reference", "recurrent", "chunked")

# The fused kernels an op may have (FusedForm records), also accepted by `impl=`.
FUSED_IMPLEMENTATIONS: tuple[str, ...] = ("fla", "triton")

AUTO = "auto"  # the choice by T (and by whether gradients are needed, for an op whose rule says so)

# Auto uses the recurrent form up to this T: on CPU (B=1, H=12, N=64) it is faster than chunked for T <= 3.
AUTO_STEP_MAX_T = 3

# What impl=None means in the current context (thread / asyncio task): "auto" unless use_impl set it.
WKV_IMPL: contextvars.ContextVar[str] = contextvars.ContextVar("rwkvkit_wkv_impl", default=AUTO)

State = torch.Tensor | Sequence[torch.Tensor] | None


@dataclass(frozen=True)
class FusedForm:
    """A fused kernel of one op (fla's, or rwkvkit's own Triton kernel), with its rule for what it runs.

    ``unavailable(tensors, state)`` is None when the kernel can run these (already validated) inputs,
    else the reason it cannot ("not a CUDA tensor", "fla is not installed", ...); it must import nothing
    heavy unless the inputs could run. ``run(*tensors, state)`` returns ``(y, final state)`` with the
    op's contract: y in the lead tensor's dtype, the state in float32.
    """

    name: str  # one of FUSED_IMPLEMENTATIONS
    unavailable: Callable[[Sequence[torch.Tensor], State], str | None]
    run: Callable[..., tuple]


@dataclass(frozen=True)
class WKVOp:
    """One WKV operator: how its arguments are laid out, its three forms and its rule for "auto".

    The tensors come in the order of ``args``; ``lead`` (one of them) has shape ``dims`` and fixes B, T
    and the device; the ``per_step`` tensors have the lead's shape and the ``per_channel`` ones its
    trailing shape (``dims[2:]``). ``check_state(op_name, state, lead)`` validates the state. The forms
    take ``(*tensors, state)``, the chunked one also ``chunk_size=`` and ``resets=`` (the variable-length
    form, :mod:`rwkvkit.wkv.varlen`), and ``chunk_length(T, chunk_size, tensors)`` is the chunk length
    it uses; ``check_chunked(tensors, chunk_len)`` is a precondition of the chunked form (None: none).
    ``step`` is the one-token kernel the models' decode fast path calls directly (not dispatched).
    """

    name: str
    args: tuple[str, ...]
    lead: str
    dims: tuple[str, ...]
    per_step: tuple[str, ...]
    per_channel: tuple[str, ...]
    check_state: Callable[[str, State, torch.Tensor], None]
    reference: Callable[..., tuple]
    recurrent: Callable[..., tuple]
    chunked: Callable[..., tuple]
    step: Callable[..., tuple]
    default_chunk_size: int
    chunk_length: Callable[[int, int, Sequence[torch.Tensor]], int]  # (T, chunk_size, tensors) -> n
    # packed rows' default chunk size: shorter than default_chunk_size where the per-step cost allows,
    # since each document's last chunk is part filler (rwkvkit.wkv.varlen)
    varlen_chunk_size: int
    recurrent_max_t: float = AUTO_STEP_MAX_T  # auto: "recurrent" for T <= this, "chunked" above
    recurrent_max_t_no_grad: float | None = None  # the bound when no input needs a gradient (None: same)
    check_chunked: Callable[[Sequence[torch.Tensor], int], None] | None = None
    fused: tuple[FusedForm, ...] = ()  # in the order "auto" tries them on a CUDA device


def _check_impl(impl: str | None, op: str = "wkv") -> None:
    if impl is not None and impl != AUTO and impl not in IMPLEMENTATIONS + FUSED_IMPLEMENTATIONS:
        raise ValueError(
            f"{op}: unknown impl {impl!r}; expected None or {AUTO!r} (auto) or one of "
            f"{IMPLEMENTATIONS + FUSED_IMPLEMENTATIONS}"
        )


def get_default_impl() -> str | None:
    """What ``impl=None`` resolves to in the current context (None = the automatic choice by T)."""
    impl = WKV_IMPL.get()
    return None if impl == AUTO else impl


@contextlib.contextmanager
def use_impl(impl: str | None) -> Iterator[None]:
    """Context manager: within the block, every WKV operator called with ``impl=None`` uses `impl`
    (None or "auto": the automatic choice). It applies to the current context only: other threads (the
    engine's, for one) and other asyncio tasks keep their own choice."""
    _check_impl(impl)
    token = WKV_IMPL.set(AUTO if impl is None else impl)
    try:
        yield
    finally:
        WKV_IMPL.reset(token)


def set_default_impl(impl: str | None) -> str | None:
    """Deprecated (use :func:`use_impl`, or pass ``impl=``): make ``impl=None`` mean `impl` in the
    current context from now on (None restores the automatic choice). Returns the previous value.

    Kept for one release. It used to switch a process-wide default; it now sets the context variable
    :data:`WKV_IMPL` of the calling thread / task only.
    """
    _check_impl(impl)
    warnings.warn(
        "rwkvkit.wkv.set_default_impl is deprecated: use `with rwkvkit.wkv.use_impl(...)` or impl=",
        DeprecationWarning,
        stacklevel=2,
    )
    previous = get_default_impl()
    WKV_IMPL.set(AUTO if impl is None else impl)
    return previous


def _needs_grad(tensors: Sequence[torch.Tensor], state: State) -> bool:
    if not torch.is_grad_enabled():
        return False
    parts = () if state is None else (state,) if isinstance(state, torch.Tensor) else tuple(state)
    return any(x.requires_grad for x in (*tensors, *parts))


def resolve_impl(op: WKVOp, impl: str | None, T: int, tensors: Sequence[torch.Tensor], state: State) -> str:
    """The implementation `op` runs for a sequence of length T: `impl`, the context's choice for None,
    and for "auto" the op's rule."""
    _check_impl(impl, op.name)
    if impl is None:
        impl = WKV_IMPL.get()
    if impl in FUSED_IMPLEMENTATIONS:
        fused_form(op, impl, tensors, state)  # raises unless it can run these inputs
        return impl
    if impl != AUTO:
        return impl
    bound = op.recurrent_max_t
    if op.recurrent_max_t_no_grad is not None and not _needs_grad(tensors, state):
        bound = op.recurrent_max_t_no_grad
    if T <= bound:
        return "recurrent"
    if on_fused_device(tensors[op.args.index(op.lead)]):
        for form in op.fused:
            if form.unavailable(tensors, state) is None:
                return form.name
    return "chunked"


def on_fused_device(lead: torch.Tensor) -> bool:
    """Whether "auto" may choose a fused kernel for inputs on lead's device (CUDA only)."""
    return lead.device.type == "cuda"


def fused_form(op: WKVOp, name: str, tensors: Sequence[torch.Tensor], state: State) -> FusedForm:
    """The fused form ``name`` of `op`, checked to run these inputs; ValueError saying why not."""
    form = next((f for f in op.fused if f.name == name), None)
    if form is None:
        have = ", ".join(f.name for f in op.fused) or "none"
        raise ValueError(f"{op.name}: no {name!r} kernel for this op (fused kernels: {have})")
    reason = form.unavailable(tensors, state)
    if reason is not None:
        raise ValueError(f"{op.name}: impl={name!r} cannot run these inputs: {reason}")
    return form


def _shape_text(dims: Sequence[str]) -> str:
    """("C",) -> "(C,)", ("H", "N") -> "(H, N)"."""
    return f"({dims[0]},)" if len(dims) == 1 else f"({', '.join(dims)})"


def validate(op: WKVOp, tensors: Sequence[torch.Tensor], state: State) -> None:
    """Raise ValueError unless the arguments fit the layout `op` declares."""
    named = dict(zip(op.args, tensors, strict=True))
    lead = named[op.lead]
    check_tensors(op.name, {n: named[n] for n in (op.lead, *op.per_step, *op.per_channel)})
    if lead.dim() != len(op.dims):
        raise ValueError(
            f"{op.name}: {op.lead} must have shape {_shape_text(op.dims)}, got {tuple(lead.shape)}"
        )
    for name in op.per_step:
        if named[name].shape != lead.shape:
            raise ValueError(
                f"{op.name}: {name} has shape {tuple(named[name].shape)}, "
                f"expected {op.lead}'s shape {tuple(lead.shape)}"
            )
    channel = tuple(lead.shape[2:])
    for name in op.per_channel:
        if named[name].shape != channel:
            raise ValueError(
                f"{op.name}: {name} has shape {tuple(named[name].shape)}, "
                f"expected {_shape_text(op.dims[2:])} = {channel}"
            )
    op.check_state(op.name, state, lead)


def run(
    op: WKVOp,
    tensors: Sequence[torch.Tensor],
    state: State,
    *,
    impl: str | None,
    chunk_size: int | None,
    resets: torch.Tensor | None = None,
) -> tuple:
    """Run `op` on `tensors` (in the order of ``op.args``) from `state`: validate, resolve the
    implementation, check the chunk size, switch autocast off, call the chosen form. ``resets`` (B, T)
    bool: packed rows, a new sequence from `state` at every True (:mod:`rwkvkit.wkv.varlen`; "auto" runs
    the chunked form there, "reference" / "recurrent" each sequence alone)."""
    validate(op, tensors, state)
    lead = tensors[op.args.index(op.lead)]
    T = lead.shape[1]
    if resets is not None:
        varlen.check_resets(op.name, resets, lead)
        if not bool(resets[:, 1:].any()):
            resets = None  # one sequence per row: the plain forms
    if resets is not None and (WKV_IMPL.get() if impl is None else impl) in (AUTO, *FUSED_IMPLEMENTATIONS):
        impl = "chunked"  # packed rows: the one form that runs them all at once (no fused varlen yet)
    impl = resolve_impl(op, impl, T, tensors, state)
    default = op.default_chunk_size if resets is None else op.varlen_chunk_size
    chunk_size = check_chunk_size(op.name, chunk_size, default)
    if impl == "chunked" and op.check_chunked is not None:
        op.check_chunked(tensors, op.chunk_length(T, chunk_size, tensors))
    with full_precision(lead.device):
        if impl in FUSED_IMPLEMENTATIONS:
            return fused_form(op, impl, tensors, state).run(*tensors, state)
        if impl == "chunked":
            if resets is not None:
                return varlen.run_chunked(op, tensors, state, resets, chunk_size)
            return op.chunked(*tensors, state, chunk_size=chunk_size)
        form = op.reference if impl == "reference" else op.recurrent
        if resets is not None:
            return varlen.run_split(op, form, tensors, state, resets)
        return form(*tensors, state)
