"""The step a CUDA graph records (``RWKVModel.decode_step``, no host-side checks) against ``forward``, and
the graph decoder's refusals. The graph itself needs a GPU: benchmarks/bench_gpu.py compares its logits
with the eager step's there."""

from __future__ import annotations

import pytest
import torch

from rwkvkit.errors import RwkvkitError
from rwkvkit.infer.cuda_graph import CUDAGraphDecoder
from rwkvkit.models import new_model


@pytest.mark.parametrize("version", ["4", "5.2", "6", "7"])
def test_decode_step_is_forward_of_one_token(version: str) -> None:
    """Three steps from a prompt's state: the same logits and states as forward's one-token path."""
    torch.manual_seed(0)
    model = new_model(version, n_layer=2, n_embd=32, vocab_size=50, head_size=16)
    tokens = torch.randint(0, 50, (3, 5))
    with torch.no_grad():
        _, state = model(tokens)
        mine = state.clone()
        for t in (7, 11, 49):
            step = torch.full((3, 1), t)
            want, state = model(step, state)
            got, mine = model.decode_step(step, mine)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            for a, b in zip(
                (mine.att_shift, mine.wkv, mine.ffn_shift),
                (state.att_shift, state.wkv, state.ffn_shift),
                strict=True,
            ):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_graph_decoder_needs_a_cuda_model() -> None:
    model = new_model("7", n_layer=1, n_embd=32, vocab_size=50, head_size=16)
    with pytest.raises(RwkvkitError, match="CUDA graphs need a model on a CUDA device"):
        CUDAGraphDecoder(model, batch_size=2)


def test_graph_pool_sizes_and_engine_refusal() -> None:
    """The pool's graph for n rows is the next power of two (capped at max_batch); the engine's
    cuda_graphs option refuses a CPU model with the same one line."""
    from rwkvkit.infer.cuda_graph import CUDAGraphPool
    from rwkvkit.infer.engine import Engine
    from rwkvkit.tokenizer import load_tokenizer

    pool = CUDAGraphPool.__new__(CUDAGraphPool)  # the size rule needs no GPU
    pool.max_batch = 48
    assert [pool.size_for(n) for n in (1, 2, 3, 5, 16, 17, 33, 48)] == [1, 2, 4, 8, 16, 32, 48, 48]
    with pytest.raises(RwkvkitError, match="1 to 48 sequences, got 49"):
        pool.size_for(49)
    model = new_model("7", n_layer=1, n_embd=32, vocab_size=256, head_size=16)
    with pytest.raises(RwkvkitError, match="CUDA graphs need a model on a CUDA device"):
        Engine(model, load_tokenizer("byte"), cuda_graphs=True)


def test_gpu_benchmark_runs_in_smoke_mode(tmp_path) -> None:
    """benchmarks/bench_gpu.py (the one command of a GPU lease) runs end to end on tiny shapes here, and
    its correctness table is right for the chunked form (errors against the float64 reference)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_gpu.py"
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, str(script), "--smoke", "--reps", "1", "--json", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300, env=env)
    result = json.loads(out.read_text())
    fp32 = [r for r in result["correctness"] if r["impl"] == "chunked" and r["dtype"] == "float32"]
    assert {r["op"] for r in fp32} == {"wkv6", "wkv7"}
    assert all(r["max_rel_err_y"] < 1e-5 and r["max_rel_err_grads"] < 1e-5 for r in fp32)
    assert all("tokens_per_s" in r for r in result["training"] if not r["compile"])
