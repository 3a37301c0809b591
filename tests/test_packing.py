"""Packed documents (``resets``, ``--pack``): every document of a packed row equals running it alone.

The reference is each document run by itself from the initial state (the ops' step-by-step reference
forms, the model on a one-document batch), outputs, final state and every gradient; the chunk-aligned
layout is checked against hand-computed positions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from asserts import assert_matches
from checkpoints import random_state_dict

from rwkvkit.errors import RwkvkitError
from rwkvkit.models.io import model_from_state_dict
from rwkvkit.train.config import TrainConfig, check_config
from rwkvkit.train.data import sample_batch
from rwkvkit.train.trainer import Trainer
from rwkvkit.wkv import wkv4, wkv6, wkv7
from rwkvkit.wkv.varlen import plan_layout, resets_from_offsets

# Documents of two rows of T = 70: lengths 1 (first and mid-row), exactly a chunk, across chunk edges.
T = 70
OFFSETS = [[0, 1, 17, 33, 34, 69], [0, 50]]


def _docs(offsets: list[int], T: int) -> list[tuple[int, int]]:
    bounds = [*offsets, T]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _v7_inputs(B: int, H: int, N: int, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    r, k, v = (torch.randn(B, T, H, N, generator=g, dtype=dtype) for _ in range(3))
    w = -0.6 * torch.rand(B, T, H, N, generator=g, dtype=dtype)
    kk = F.normalize(torch.randn(B, T, H, N, generator=g, dtype=dtype), dim=-1)
    a, b = -kk, kk * torch.rand(B, T, H, N, generator=g, dtype=dtype)
    return [r, w, k, v, a, b]


def _v6_inputs(B: int, H: int, N: int, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    r, k, v = (torch.randn(B, T, H, N, generator=g, dtype=dtype) for _ in range(3))
    w = -torch.exp(torch.randn(B, T, H, N, generator=g, dtype=dtype) - 1)
    u = torch.randn(H, N, generator=g, dtype=dtype)
    return [r, w, k, v, u]


def _v4_inputs(B: int, C: int, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    w = -torch.exp(torch.randn(C, generator=g, dtype=dtype) - 1)
    u = torch.randn(C, generator=g, dtype=dtype)
    k, v = (torch.randn(B, T, C, generator=g, dtype=dtype) for _ in range(2))
    return [w, u, k, v]


# (op, inputs, which inputs are per step, initial state, chunk size: several per document)
def _case(name: str, dtype: torch.dtype):
    B, H, N, C = len(OFFSETS), 2, 8, 6
    g = torch.Generator().manual_seed(3)
    if name == "wkv7":
        return (
            wkv7,
            _v7_inputs(B, H, N, dtype),
            6,
            0.3 * torch.randn(B, H, N, N, generator=g, dtype=dtype),
            16,
        )
    if name == "wkv6":
        return (
            wkv6,
            _v6_inputs(B, H, N, dtype),
            4,
            0.3 * torch.randn(B, H, N, N, generator=g, dtype=dtype),
            16,
        )
    aa, pp = torch.randn(B, C, generator=g, dtype=dtype), torch.randn(B, C, generator=g, dtype=dtype)
    bb = torch.rand(B, C, generator=g, dtype=dtype) + 0.5
    return wkv4, _v4_inputs(B, C, dtype), 4, (aa, bb, pp), 8


def _flat_state(state) -> torch.Tensor:
    return torch.cat([s.flatten() for s in state]) if isinstance(state, tuple) else state.flatten()


def _with_grads(tensors, state):
    tensors = [t.clone().requires_grad_() for t in tensors]
    state = (
        tuple(s.clone().requires_grad_() for s in state)
        if isinstance(state, tuple)
        else state.clone().requires_grad_()
    )
    return tensors, state


def _objective(y: torch.Tensor, final) -> torch.Tensor:
    """A fixed random linear function of the outputs and the final state (its gradients are the test's)."""
    g = torch.Generator().manual_seed(9)
    flat = _flat_state(final)
    return (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum() + (
        flat * torch.randn(flat.shape, generator=g, dtype=flat.dtype)
    ).sum()


def _alone(op, tensors, n_step: int, state):
    """Each document of each row run by itself through the step-by-step reference, from its row's state."""
    ys, finals = [], []
    for b, row in enumerate(OFFSETS):
        row_ys = []
        for start, end in _docs(row, T):
            if op is wkv6:  # r, w, k, v per step, u per head
                piece = [x[b : b + 1, start:end] for x in tensors[:4]] + [tensors[4]]
            elif op is wkv7:
                piece = [x[b : b + 1, start:end] for x in tensors]
            else:  # wkv4: w, u per channel, k, v per step
                piece = tensors[:2] + [x[b : b + 1, start:end] for x in tensors[2:]]
            row_state = tuple(s[b : b + 1] for s in state) if isinstance(state, tuple) else state[b : b + 1]
            y, final = op(*piece, row_state, impl="reference")
            row_ys.append(y)
        ys.append(torch.cat(row_ys, dim=1))
        finals.append(final)
    final = (
        tuple(torch.cat(p, dim=0) for p in zip(*finals, strict=True))
        if isinstance(finals[0], tuple)
        else torch.cat(finals, dim=0)
    )
    return torch.cat(ys, dim=0), final


@pytest.mark.parametrize("name", ["wkv4", "wkv6", "wkv7"])
@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_packed_chunked_equals_each_document_alone(name: str, dtype: torch.dtype, rel: float) -> None:
    op, tensors, n_step, state, chunk = _case(name, dtype)
    resets = resets_from_offsets(OFFSETS, T)
    results = {}
    for form in ("packed", "alone"):
        inputs, s0 = _with_grads(tensors, state)
        if form == "packed":
            y, final = op(*inputs, s0, impl="chunked", chunk_size=chunk, resets=resets)
        else:
            y, final = _alone(op, inputs, n_step, s0)
        leaves = [*inputs, *(s0 if isinstance(s0, tuple) else (s0,))]
        grads = torch.autograd.grad(_objective(y, final), leaves)
        results[form] = (y, _flat_state(final), grads)
    packed, alone = results["packed"], results["alone"]
    assert_matches(packed[0], alone[0], f"{name} y", rel)
    assert_matches(packed[1], alone[1], f"{name} final state", rel)
    for i, (gp, ga) in enumerate(zip(packed[2], alone[2], strict=True)):
        assert_matches(gp, ga, f"{name} grad {i}", rel)


@pytest.mark.parametrize("name", ["wkv4", "wkv6", "wkv7"])
def test_packed_reference_and_auto_forms(name: str) -> None:
    """impl='reference' with resets runs each document alone; 'auto' takes the packed chunked form."""
    op, tensors, n_step, state, _ = _case(name, torch.float64)
    resets = resets_from_offsets(OFFSETS, T)
    y_ref, s_ref = _alone(op, tensors, n_step, state)
    for impl in ("reference", "recurrent", None):
        y, s = op(*tensors, state, impl=impl, resets=resets)
        assert_matches(y, y_ref, f"{name} {impl} y", 1e-10)
        assert_matches(_flat_state(s), _flat_state(s_ref), f"{name} {impl} state", 1e-10)


def test_no_document_start_is_the_plain_op() -> None:
    tensors = _v7_inputs(2, 2, 8, torch.float64)
    plain = wkv7(*tensors)
    packed = wkv7(*tensors, resets=torch.zeros(2, T, dtype=torch.bool))
    assert torch.equal(plain[0], packed[0]) and torch.equal(plain[1], packed[1])


def test_layout_by_hand() -> None:
    """Row 0: documents of 3, 5 and 1 steps with chunks of 4 -> chunks [d0 d0 d0 .][d1 d1 d1 d1][d1 . . .]
    [d2 . . .]; row 1: one document of 9 -> [d d d d][d d d d][d . . .][. . . .]."""
    resets = torch.zeros(2, 9, dtype=torch.bool)
    resets[0, 3] = resets[0, 8] = True
    layout = plan_layout(resets, 4)
    assert layout.dst.tolist() == [[0, 1, 2, 4, 5, 6, 7, 8, 12], [0, 1, 2, 3, 4, 5, 6, 7, 8]]
    assert layout.chunk_resets.tolist() == [[True, True, False, True], [True, False, False, False]]
    assert layout.src.tolist()[0] == [0, 1, 2, 9, 3, 4, 5, 6, 7, 9, 9, 9, 8, 9, 9, 9]
    assert layout.tail.tolist() == [3, 7]


def test_bad_resets() -> None:
    tensors = _v7_inputs(2, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="resets must be a bool tensor"):
        wkv7(*tensors, resets=torch.zeros(2, T))
    with pytest.raises(ValueError, match="resets must be a bool tensor"):
        wkv7(*tensors, resets=torch.zeros(2, T - 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="outside"):
        resets_from_offsets([[0, T]], T)


# ---------------------------------------------------------------------------------------------- models

VOCAB, C_MODEL, HEAD = 40, 32, 8


def _model(version: str):
    sd = random_state_dict(
        version,
        n_layer=2,
        n_embd=C_MODEL,
        vocab_size=VOCAB,
        **({} if version == "4" else {"head_size": HEAD}),
    )
    return model_from_state_dict(sd).train()


@pytest.mark.parametrize("version", ["4", "5.2", "6", "7"])
def test_model_packed_row_equals_documents_alone(version: str) -> None:
    """Logits of a packed row equal each document's alone, and the summed loss has the same gradients."""
    torch.manual_seed(0)
    model = _model(version)
    lengths = [[7, 1, 30, 12], [25, 25]]  # two rows of 50 tokens
    rows = [torch.randint(1, VOCAB, (sum(lens),)) for lens in lengths]
    tokens = torch.stack(rows)  # (2, 50)
    resets = torch.zeros_like(tokens, dtype=torch.bool)
    for b, lens in enumerate(lengths):
        for start in torch.tensor(lens).cumsum(0)[:-1].tolist():
            resets[b, start] = True
    targets = torch.randint(0, VOCAB, tokens.shape)

    logits, _ = model(tokens, resets=resets)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    packed_grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)

    pieces, alone_loss = [], 0.0
    for b, lens in enumerate(lengths):
        start = 0
        for n in lens:
            doc_logits, _ = model(tokens[b : b + 1, start : start + n])
            pieces.append((b, start, doc_logits[0]))
            alone_loss = alone_loss + F.cross_entropy(
                doc_logits[0], targets[b, start : start + n], reduction="sum"
            )
            start += n
    alone_grads = torch.autograd.grad(alone_loss, list(model.parameters()), allow_unused=True)
    for b, start, doc_logits in pieces:
        assert_matches(logits[b, start : start + doc_logits.shape[0]], doc_logits, f"v{version} logits", 1e-5)
    for (name, _), gp, ga in zip(model.named_parameters(), packed_grads, alone_grads, strict=True):
        assert (gp is None) == (ga is None), name  # (RWKV-7's layer 0 has value weights it never uses)
        if gp is not None:
            assert_matches(gp, ga, f"v{version} grad {name}", 1e-5)


def test_model_resets_errors() -> None:
    model = _model("7")
    tokens = torch.randint(0, VOCAB, (1, 8))
    with pytest.raises(RwkvkitError, match="resets must be a bool tensor"):
        model(tokens, resets=torch.zeros(1, 7, dtype=torch.bool))
    with pytest.raises(RwkvkitError, match="state=None"):
        model(tokens, model.initial_state(1), resets=torch.zeros(1, 8, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------- training


def test_pack_and_seq_len_refused() -> None:
    with pytest.raises(RwkvkitError, match="choose one"):
        check_config(TrainConfig(pack=True, seq_len=512, ctx_len=256))


def test_trainer_pack_loss_is_per_document(tmp_path) -> None:
    """With --pack the step's loss is the mean CE of each document from the initial state, the 0 that
    separates two documents beginning the next one."""
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(1, 256, (int(n),), generator=g) for n in torch.randint(3, 40, (40,), generator=g)]
    stream = torch.cat([torch.cat((d, torch.zeros(1, dtype=torch.long))) for d in docs]).numpy()
    data = tmp_path / "docs.npy"
    np.save(data, stream.astype(np.int64))
    cfg = TrainConfig(
        data=str(data),
        n_layer=2,
        n_embd=32,
        head_size=8,
        ctx_len=64,
        batch_size=4,
        steps=1,
        pack=True,
        out=str(tmp_path / "run"),
        progress=False,
        l2wrap=False,
    )
    with Trainer(cfg) as trainer:
        trainer.setup()
        loss = trainer.forward_backward()
        x, y = sample_batch(trainer.tokens, 0, cfg.batch_size, cfg.ctx_len, cfg.seed)
        model = trainer.parts.model
        total, count = 0.0, 0
        with torch.no_grad():
            for b in range(x.shape[0]):
                starts = [0, *(torch.nonzero(x[b, 1:] == 0).flatten() + 1).tolist(), x.shape[1]]
                for s, e in zip(starts[:-1], starts[1:], strict=True):
                    logits, _ = model(x[b : b + 1, s:e])
                    total += F.cross_entropy(logits[0], y[b, s:e], reduction="sum").item()
                    count += e - s
        assert count == x.numel()
        assert abs(loss - total / count) < 1e-5 * abs(loss)
