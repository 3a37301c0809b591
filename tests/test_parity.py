"""Parity with the reference ``rwkv`` package (0.8.32, 'cpu fp32') for every version, and RNN/parallel
equivalence: whole sequence == split into pieces with carried state == one token at a time; each row of a
batch == that row alone.

Checkpoints are random, in the official layout, built independently of rwkvkit's model code.
"""

from __future__ import annotations

import pytest
import torch
from checkpoints import random_state_dict
from reference import reference_logits, reference_model

from rwkvkit import load_model
from rwkvkit.state import RWKVState
from rwkvkit.wkv import IMPLEMENTATIONS, use_impl

CASES = {
    # name: (version, kwargs of that version's random checkpoint builder)
    "v4-tiny": ("4", dict(n_layer=2, n_embd=64, vocab_size=97)),
    "v4-odd-widths": ("4", dict(n_layer=3, n_embd=96, vocab_size=211, dim_ffn=320)),
    "v4-world-vocab": ("4", dict(n_layer=2, n_embd=128, vocab_size=65536)),
    "v5-H4": ("5.2", dict(n_layer=2, n_embd=64, head_size=16, vocab_size=97)),
    "v5-H1-odd-ffn": ("5.2", dict(n_layer=3, n_embd=32, head_size=32, vocab_size=300, dim_ffn=96)),
    "v5-world-vocab": ("5.2", dict(n_layer=2, n_embd=128, head_size=64, vocab_size=65536)),
    "v5-time-state": ("5.2", dict(n_layer=2, n_embd=64, head_size=32, vocab_size=97, time_state=True)),
    "v6-H4": ("6", dict(n_layer=2, n_embd=64, head_size=16, vocab_size=97)),
    "v6-odd-widths": ("6", dict(n_layer=4, n_embd=96, head_size=32, vocab_size=211, d_mix=12, d_decay=20)),
    "v6-world-vocab": (
        "6",
        dict(n_layer=2, n_embd=128, head_size=64, vocab_size=65536, d_mix=32, d_decay=64),
    ),
    "v6-time-state": ("6", dict(n_layer=2, n_embd=64, head_size=16, vocab_size=97, time_state=True)),
    "v7-H4": ("7", dict(n_layer=2, n_embd=64, head_size=16, vocab_size=97)),
    "v7-H1-no-layer0-vlora": (
        "7",
        dict(n_layer=3, n_embd=32, head_size=32, vocab_size=300, layer0_value_lora=False),
    ),
    "v7-world-vocab": (
        "7",
        dict(
            n_layer=2, n_embd=128, head_size=64, vocab_size=65536, d_decay=32, d_iclr=16, d_value=8, d_gate=24
        ),
    ),
    "v7-odd-widths": (
        "7",
        dict(n_layer=4, n_embd=96, head_size=32, vocab_size=211, dim_ffn=320, d_decay=12, d_gate=20),
    ),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 2e-5) -> None:
    """Max abs error within ``rel`` of the expected tensor's scale."""
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= rel * max(scale, 1.0), f"max error {err:.3e} vs scale {scale:.3e}"


def assert_same_wkv(version: str, ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Compare one sequence's WKV state of one layer with another of the same layout (L-less).

    RWKV-4's (aa, bb, pp) (3, C) hold A = aa e^pp and B = bb e^pp: equal states may differ in pp, so
    (aa, bb) are compared after rescaling to the other's pp. The others are (H, N, N) tensors.
    """
    if version != "4":
        assert_close(ours, theirs)
        return
    aa, bb, pp = ours.double()
    aa_ref, bb_ref, pp_ref = theirs.double()
    scale = torch.exp(pp - pp_ref)
    assert_close(aa * scale, aa_ref)
    assert_close(bb * scale, bb_ref)


def reference_state_layer(
    version: str, ref_state: list, i: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Layer i of the reference state as (att shift, wkv in rwkvkit's layout, ffn shift)."""
    if version == "4":  # [att_xx, aa, bb, pp, ffn_xx] per layer
        att, aa, bb, pp, ffn = ref_state[5 * i : 5 * i + 5]
        return att, torch.stack((aa, bb, pp)), ffn
    att, wkv, ffn = ref_state[3 * i : 3 * i + 3]
    if version in ("5.2", "6"):  # the pip package keeps v5/v6 states as [key, value]
        wkv = wkv.transpose(-1, -2)
    return att, wkv, ffn


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(version, rwkvkit model, reference model, vocab size) on the same random checkpoint."""
    version, kwargs = CASES[request.param]
    sd = random_state_dict(version, seed=len(request.param), **kwargs)
    path = tmp_path_factory.mktemp(request.param) / "model.pth"
    torch.save(sd, path)
    return version, load_model(path), reference_model(path, version), kwargs["vocab_size"]


def random_tokens(vocab: int, n: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.inference_mode()
def test_prompt_logits_and_continuation_match_reference(case):
    version, model, ref, vocab = case
    assert model.config.version == version
    prompt = random_tokens(vocab, 23, seed=1)
    ref_logits, ref_state = reference_logits(ref, prompt)
    logits, state = model(torch.tensor([prompt]))
    assert logits.shape == (1, len(prompt), vocab) and logits.dtype == torch.float32
    assert_close(logits[0], ref_logits)
    for i in range(model.config.n_layer):
        att, wkv, ffn = reference_state_layer(version, ref_state, i)
        assert_close(state.att_shift[i, 0], att)
        assert_same_wkv(version, state.wkv[i, 0], wkv)
        assert_close(state.ffn_shift[i, 0], ffn)
    # continue one token at a time with the carried state (the RNN path)
    for token in random_tokens(vocab, 6, seed=2):
        ref_out, ref_state = reference_logits(ref, [token], ref_state)
        out, state = model(torch.tensor([[token]]), state)
        assert_close(out[0], ref_out)


def assert_same_state(version: str, a: RWKVState, b: RWKVState) -> None:
    assert_close(a.att_shift, b.att_shift)
    assert_close(a.ffn_shift, b.ffn_shift)
    for layer_a, layer_b in zip(a.wkv.flatten(0, 1), b.wkv.flatten(0, 1), strict=True):
        assert_same_wkv(version, layer_a, layer_b)


@torch.inference_mode()
def test_whole_equals_split_equals_stepwise(case):
    version, model, _, vocab = case
    tokens = torch.tensor([random_tokens(vocab, 40, seed=3)])
    whole, whole_state = model(tokens)
    pieces, state = [], None
    for lo, hi in [(0, 7), (7, 8), (8, 25), (25, 40)]:
        out, state = model(tokens[:, lo:hi], state)
        pieces.append(out)
    assert_close(torch.cat(pieces, dim=1), whole)
    assert_same_state(version, state, whole_state)
    steps, state = [], None
    for t in range(tokens.shape[1]):
        out, state = model(tokens[:, t : t + 1], state)
        steps.append(out)
    assert_close(torch.cat(steps, dim=1), whole)
    assert_same_state(version, state, whole_state)
    # the one dispatch switch moves the whole model between the operators' two forms
    for impl in IMPLEMENTATIONS:
        with use_impl(impl):
            forced, forced_state = model(tokens)
        assert_close(forced, whole)
        assert_same_state(version, forced_state, whole_state)


@torch.inference_mode()
def test_batch_rows_equal_rows_alone(case):
    version, model, _, vocab = case
    batch = torch.tensor([random_tokens(vocab, 19, seed=s) for s in (4, 5, 6)])
    logits, state = model(batch)
    for row in range(batch.shape[0]):
        alone, alone_state = model(batch[row : row + 1])
        assert_close(logits[row : row + 1], alone)
        assert_same_state(version, state.select([row]), alone_state)
    # and continuing a selected/reordered batch keeps each row's own state
    nxt = torch.tensor([[1], [2], [3]])
    out, _ = model(nxt[[2, 0]], state.select([2, 0]))
    out0, _ = model(nxt[[0]], state.select([0]))
    assert_close(out[1:2], out0)


@pytest.mark.parametrize("version", ["4", "5.2", "6", "7"])
def test_low_precision_checkpoints_match_reference(tmp_path, version):
    """bf16 and fp16 files (as released models ship) load and match the reference run in fp32.

    The reference's v4-v6 class layer-norms the embedding in the file's dtype before converting it, an
    error of the size of bf16 rounding; there it runs on an fp32 copy of the same (rounded) weights.
    """
    for dtype in (torch.bfloat16, torch.float16):
        sd = random_state_dict(version, n_layer=2, n_embd=64, vocab_size=120, dtype=dtype, seed=9)
        path = tmp_path / f"m_{dtype}.pth".replace("torch.", "")
        torch.save(sd, path)
        ref_path = path
        if version != "7":
            ref_path = tmp_path / f"m_{dtype}_as_fp32.pth".replace("torch.", "")
            torch.save({k: v.float() for k, v in sd.items()}, ref_path)
        model, ref = load_model(path), reference_model(ref_path, version)
        prompt = random_tokens(120, 11, seed=7)
        with torch.inference_mode():
            logits, _ = model(torch.tensor([prompt]))
        assert_close(logits[0], reference_logits(ref, prompt)[0])


def test_state_zeros_layout():
    from rwkvkit.config import config_from_state_dict

    cfg = config_from_state_dict(random_state_dict("7", n_layer=3, n_embd=64, head_size=16))
    s = RWKVState.zeros(cfg, batch_size=2)
    assert s.wkv.shape == (3, 2, 4, 16, 16) and s.wkv.dtype == torch.float32
    assert s.att_shift.shape == (3, 2, 64) and s.ffn_shift.shape == (3, 2, 64)
    cfg4 = config_from_state_dict(random_state_dict("4", n_layer=3, n_embd=64))
    s4 = RWKVState.zeros(cfg4, batch_size=2)
    assert s4.wkv.shape == (3, 2, 3, 64) and s4.wkv.dtype == torch.float32
    assert (s4.wkv[:, :, :2] == 0).all() and (s4.wkv[:, :, 2] <= -1e30).all()  # aa = bb = 0, pp = -1e38


def test_v4_with_a_wider_time_mix_runs_the_same_in_every_mode(tmp_path):
    """RWKV-4 with dim_att != n_embd (the trainer's option; the reference's sequence mode cannot run
    it): the chunked form, the step form and token-by-token agree."""
    path = tmp_path / "wide.pth"
    torch.save(random_state_dict("4", n_layer=2, n_embd=32, dim_att=48, vocab_size=50, seed=5), path)
    model = load_model(path)
    assert model.config.dim_att == 48
    tokens = torch.tensor([random_tokens(50, 21, seed=1)])
    with torch.inference_mode():
        with use_impl("chunked"):
            chunked, chunked_state = model(tokens)
        stepwise, state = [], None
        for t in range(tokens.shape[1]):
            out, state = model(tokens[:, t : t + 1], state)
            stepwise.append(out)
    assert_close(torch.cat(stepwise, dim=1), chunked)
    assert_same_state("4", state, chunked_state)


@torch.inference_mode()
def test_v7_tuned_state_matches_the_reference_given_that_state(tmp_path):
    """A v7 file with att.time_state keys: rwkvkit starts from them; the reference (which ignores the
    keys) gives the same logits when handed them as its initial state, as the model docstring says."""
    sd = random_state_dict("7", n_layer=3, n_embd=64, head_size=16, vocab_size=97, time_state=True, seed=2)
    path = tmp_path / "tuned.pth"
    torch.save(sd, path)
    model, ref = load_model(path), reference_model(path, "7")
    assert model.config.has_time_state
    prompt = random_tokens(97, 13, seed=4)
    state = ref.generate_zero_state()
    for i in range(3):
        state[3 * i + 1] = sd[f"blocks.{i}.att.time_state"].float().clone()
    ref_logits, _ = reference_logits(ref, prompt, state)
    logits, _ = model(torch.tensor([prompt]))
    assert_close(logits[0], ref_logits)
    untuned, _ = reference_logits(ref, prompt)
    assert (untuned - ref_logits).abs().max() > 1e-2  # the tuned state does change the output
