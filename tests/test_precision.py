"""fp16 / bf16 safety: deep models whose activations leave fp16's range still give finite, right logits.

Released RWKV models accumulate a residual stream far beyond fp16's 65504 (the reference package halves
it every 6 layers under fp16). rwkvkit keeps the residual in fp32 and computes each sub-block's output
2^-(layer // 6) smaller (see rwkvkit.models.common). The stress model here is built so that a plain fp16
evaluation would overflow twice over: its residual exceeds 65504, and so do single sub-block outputs of
its deepest layer. (Top-1 agreement of fp16/bf16 with fp32 on trained models is checked in
test_train.py, where each version is trained on Shakespeare.)
"""

from __future__ import annotations

import pytest
import torch
from checkpoints import random_state_dict
from reference import reference_logits, reference_model

from rwkvkit.models import model_from_state_dict

FP16_MAX = torch.finfo(torch.float16).max  # 65504


def sub_block_outputs(model, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and the true (unscaled) output of every time mix and channel mix, in order of layers."""
    outputs: list[torch.Tensor] = []

    def record(module, _inputs, out):
        out = out[0] if isinstance(out, tuple) else out
        outputs.append(out.float() / module.output_scale)

    hooks = [m.register_forward_hook(record) for b in model.blocks for m in (b.att, b.ffn)]
    try:
        with torch.inference_mode():
            logits, _ = model(tokens)
    finally:
        for h in hooks:
            h.remove()
    return logits, outputs


def stress_state_dict(version: str) -> dict[str, torch.Tensor]:
    """13 layers of fp16-exact random weights whose residual contributions are scaled up: by 2^k overall
    (ln0 and every output projection, so each layer's input is unchanged) and by 2^(layer // 6) more
    with depth, as trained models grow them."""
    sd = random_state_dict(version, n_layer=13, n_embd=64, vocab_size=64, seed=3, dtype=torch.float16)
    sd = {k: v.float() for k, v in sd.items()}
    scale = 2.0**13

    def scaled(key: str, value: torch.Tensor) -> torch.Tensor:
        if key.endswith(("att.output.weight", "ffn.value.weight")):
            return value * scale * 2 ** (int(key.split(".")[1]) // 6)
        if key.startswith("blocks.0.ln0."):
            return value * scale
        return value

    return {k: scaled(k, v) for k, v in sd.items()}


@pytest.mark.parametrize("version", ["4", "5.2", "6", "7"])
def test_fp16_stays_finite_where_activations_exceed_its_range(tmp_path, version):
    sd = stress_state_dict(version)
    tokens = torch.randint(0, 64, (1, 64), generator=torch.Generator().manual_seed(0))
    model32 = model_from_state_dict(sd)
    logits32, outputs = sub_block_outputs(model32, tokens)
    residual = torch.stack(outputs).sum(0).abs().max().item()
    assert residual > FP16_MAX  # an fp16 residual stream would be inf
    assert max(o.abs().max().item() for o in outputs[-2:]) > FP16_MAX  # so would a layer-12 output
    # fp32 is exact with the output scaling: the reference package (no rescaling in fp32) agrees
    path = tmp_path / "stress.pth"
    torch.save(sd, path)
    ref_logits, _ = reference_logits(reference_model(path, version), tokens[0].tolist())
    assert (logits32[0] - ref_logits).abs().max() < 1e-4 * ref_logits.abs().max()
    for dtype, tolerance in ((torch.float16, 0.1), (torch.bfloat16, None)):
        with torch.inference_mode():
            logits, state = model_from_state_dict(sd, dtype=dtype)(tokens)
        assert torch.isfinite(logits).all() and torch.isfinite(state.wkv).all(), dtype
        if tolerance is not None:  # bf16 has fp32's range; its precision is checked on trained models
            rel = ((logits - logits32).norm() / logits32.norm()).item()
            assert rel < tolerance, (dtype, rel)
