"""RWKV-7 parity with the reference ``rwkv`` package (0.8.32, 'cpu fp32'), and RNN/parallel equivalence.

Checkpoints are random, in the official layout, built independently of rwkvkit's model code.
"""

from __future__ import annotations

import pytest
import torch
from checkpoints import random_v7_state_dict
from reference import reference_logits, reference_model

from rwkvkit import load_model
from rwkvkit.state import RWKVState

SHAPES = {
    # name: kwargs of random_v7_state_dict
    "tiny-H4": dict(n_layer=2, n_embd=64, head_size=16, vocab_size=97),
    "H1-no-layer0-vlora": dict(n_layer=3, n_embd=32, head_size=32, vocab_size=300, layer0_value_lora=False),
    "world-vocab": dict(
        n_layer=2, n_embd=128, head_size=64, vocab_size=65536, d_decay=32, d_iclr=16, d_value=8, d_gate=24
    ),
    "odd-widths": dict(
        n_layer=4, n_embd=96, head_size=32, vocab_size=211, dim_ffn=320, d_decay=12, d_gate=20
    ),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 2e-5) -> None:
    """Max abs error within ``rel`` of the expected tensor's scale."""
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= rel * max(scale, 1.0), f"max error {err:.3e} vs scale {scale:.3e}"


@pytest.fixture(scope="module", params=list(SHAPES))
def pair(request, tmp_path_factory):
    """(rwkvkit model, reference model, vocab size) on the same random checkpoint."""
    sd = random_v7_state_dict(seed=len(request.param), **SHAPES[request.param])
    path = tmp_path_factory.mktemp(request.param) / "model.pth"
    torch.save(sd, path)
    return load_model(path), reference_model(path), SHAPES[request.param]["vocab_size"]


def random_tokens(vocab: int, n: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.inference_mode()
def test_prompt_logits_and_continuation_match_reference(pair):
    model, ref, vocab = pair
    prompt = random_tokens(vocab, 23, seed=1)
    ref_logits, ref_state = reference_logits(ref, prompt)
    logits, state = model(torch.tensor([prompt]))
    assert logits.shape == (1, len(prompt), vocab) and logits.dtype == torch.float32
    assert_close(logits[0], ref_logits)
    for i in range(model.config.n_layer):
        assert_close(state.wkv[i, 0], ref_state[3 * i + 1])
        assert_close(state.att_shift[i, 0], ref_state[3 * i])
        assert_close(state.ffn_shift[i, 0], ref_state[3 * i + 2])
    # continue one token at a time with the carried state (the RNN path)
    for token in random_tokens(vocab, 6, seed=2):
        ref_out, ref_state = reference_logits(ref, [token], ref_state)
        out, state = model(torch.tensor([[token]]), state)
        assert_close(out[0], ref_out)


@torch.inference_mode()
def test_whole_equals_split_equals_stepwise(pair):
    model, _, vocab = pair
    tokens = torch.tensor([random_tokens(vocab, 40, seed=3)])
    whole, whole_state = model(tokens)
    pieces, state = [], None
    for lo, hi in [(0, 7), (7, 8), (8, 25), (25, 40)]:
        out, state = model(tokens[:, lo:hi], state)
        pieces.append(out)
    assert_close(torch.cat(pieces, dim=1), whole)
    assert_close(state.wkv, whole_state.wkv)
    steps, state = [], None
    for t in range(tokens.shape[1]):
        out, state = model(tokens[:, t : t + 1], state)
        steps.append(out)
    assert_close(torch.cat(steps, dim=1), whole)
    assert_close(state.wkv, whole_state.wkv)
    assert_close(state.att_shift, whole_state.att_shift)
    assert_close(state.ffn_shift, whole_state.ffn_shift)


@torch.inference_mode()
def test_batch_rows_equal_rows_alone(pair):
    model, _, vocab = pair
    batch = torch.tensor([random_tokens(vocab, 19, seed=s) for s in (4, 5, 6)])
    logits, state = model(batch)
    for row in range(batch.shape[0]):
        alone, alone_state = model(batch[row : row + 1])
        assert_close(logits[row : row + 1], alone)
        assert_close(state.select([row]).wkv, alone_state.wkv)
    # and continuing a selected/reordered batch keeps each row's own state
    nxt = torch.tensor([[1], [2], [3]])
    out, _ = model(nxt[[2, 0]], state.select([2, 0]))
    out0, _ = model(nxt[[0]], state.select([0]))
    assert_close(out[1:2], out0)


def test_low_precision_checkpoints_match_reference(tmp_path):
    """bf16 and fp16 files (as released models ship) load and match the reference run in fp32."""
    for dtype in (torch.bfloat16, torch.float16):
        sd = random_v7_state_dict(n_layer=2, n_embd=64, head_size=32, vocab_size=120, dtype=dtype, seed=9)
        path = tmp_path / f"m_{dtype}.pth".replace("torch.", "")
        torch.save(sd, path)
        model, ref = load_model(path), reference_model(path)
        prompt = random_tokens(120, 11, seed=7)
        with torch.inference_mode():
            logits, _ = model(torch.tensor([prompt]))
        assert_close(logits[0], reference_logits(ref, prompt)[0])


def test_state_zeros_layout():
    sd = random_v7_state_dict(n_layer=3, n_embd=64, head_size=16)
    from rwkvkit.config import config_from_state_dict

    cfg = config_from_state_dict(sd)
    s = RWKVState.zeros(cfg, batch_size=2)
    assert s.wkv.shape == (3, 2, 4, 16, 16) and s.wkv.dtype == torch.float32
    assert s.att_shift.shape == (3, 2, 64) and s.ffn_shift.shape == (3, 2, 64)
