"""Tests for the ``rwkvkit`` command line: info, generate, error reporting and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoints import random_state_dict, random_v7_state_dict
from reference import reference_logits, reference_model

from rwkvkit import infer
from rwkvkit.cli import common as cli
from rwkvkit.cli import info as cli_info
from rwkvkit.cli import main
from rwkvkit.errors import RwkvkitError
from rwkvkit.infer import generate_text
from rwkvkit.models import load_model
from rwkvkit.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Small checkpoints and broken files, written once for the module."""
    d = tmp_path_factory.mktemp("cli")
    out = {}
    out["byte"] = d / "byte256.pth"  # vocab 256: the byte tokenizer is the default
    torch.save(random_v7_state_dict(vocab_size=256, seed=1), out["byte"])
    out["v97"] = d / "v97.pth"  # vocab 97: no default tokenizer
    torch.save(random_v7_state_dict(vocab_size=97, seed=2), out["v97"])
    out["bf16"] = d / "bf16.pth"
    torch.save(random_v7_state_dict(n_layer=3, dtype=torch.bfloat16, d_value=8), out["bf16"])

    out["text"] = d / "notes.pth"
    out["text"].write_text("these are my notes, not a checkpoint\n")
    out["truncated"] = d / "truncated.pth"
    data = out["byte"].read_bytes()
    out["truncated"].write_bytes(data[: len(data) // 2])
    out["unrelated"] = d / "unrelated.pth"
    torch.save({"encoder.weight": torch.randn(4, 4), "decoder.bias": torch.randn(4)}, out["unrelated"])
    C = 32
    out["rwkv4_incomplete"] = d / "rwkv4_incomplete.pth"  # detected as RWKV-4, most keys missing
    torch.save(
        {
            "emb.weight": torch.randn(50, C),
            "blocks.0.ln0.weight": torch.ones(C),
            "blocks.0.att.time_decay": torch.randn(C),
            "blocks.0.att.time_first": torch.randn(C),
            "blocks.0.att.time_mix_k": torch.randn(1, 1, C),
            "blocks.0.att.key.weight": torch.randn(C, C),
            "blocks.0.ffn.key.weight": torch.randn(4 * C, C),
            "head.weight": torch.randn(50, C),
        },
        out["rwkv4_incomplete"],
    )
    out["rwkv51"] = d / "rwkv51.pth"  # RWKV-5.1: ln_x and a gate, but a per-head (H,) decay
    torch.save(
        {
            "emb.weight": torch.randn(50, C),
            "blocks.0.att.time_decay": torch.randn(2),
            "blocks.0.att.gate.weight": torch.randn(C, C),
            "blocks.0.att.ln_x.weight": torch.ones(C),
            "blocks.0.ffn.key.weight": torch.randn(4 * C, C),
        },
        out["rwkv51"],
    )
    out["prompt"] = d / "prompt.txt"
    out["prompt"].write_text("Once upon a time", encoding="utf-8")
    out["latin1"] = d / "latin1.txt"
    out["latin1"].write_bytes("café".encode("latin-1"))
    return out


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *words: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word.lower() in lines[0].lower(), f"{word!r} not in {lines[0]!r}"


# ---------------------------------------------------------------------------------------------- info


def test_info_text(capsys, files):
    code, out, err = run_cli(capsys, "info", files["bf16"])
    assert code == 0 and err == ""
    sd = torch.load(files["bf16"], weights_only=True)
    n_params = sum(t.numel() for t in sd.values())
    rows = {k: v.strip() for k, v in (line.split("  ", 1) for line in out.splitlines())}
    assert rows["version"] == "RWKV-7"
    assert rows["layers"] == "3"
    assert rows["n_embd"] == "64"
    assert rows["heads"] == "4 x 16"
    assert rows["ffn width"] == "256"
    assert rows["vocab"] == "97"
    assert rows["low-rank"] == "decay 8, iclr 8, value 8, gate 16"
    assert rows["parameters"] == f"{n_params:,}"
    assert rows["dtype"] == f"bfloat16 ({len(sd)} tensors)"
    assert f"{files['bf16'].stat().st_size:,} bytes" in rows["file"]


def test_info_json(capsys, files):
    code, out, _ = run_cli(capsys, "info", "--json", files["byte"])
    assert code == 0
    info = json.loads(out)
    sd = torch.load(files["byte"], weights_only=True)
    assert info["parameters"] == sum(t.numel() for t in sd.values())
    assert info["tensors"] == len(sd)
    assert info["dtypes"] == {"float32": len(sd)}
    assert info["file_size"] == files["byte"].stat().st_size
    assert (info["version"], info["n_layer"], info["n_embd"]) == ("7", 2, 64)
    assert (info["n_head"], info["head_size"], info["dim_ffn"], info["vocab_size"]) == (4, 16, 256, 256)
    assert (info["d_decay"], info["d_iclr"], info["d_value"], info["d_gate"]) == (8, 8, 4, 16)


def test_info_safetensors(capsys, files, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    save_file(random_v7_state_dict(vocab_size=50), str(path))
    code, out, _ = run_cli(capsys, "info", "--json", path)
    assert code == 0 and json.loads(out)["vocab_size"] == 50


# ---------------------------------------------------------------------------------------------- generate


def test_generate_greedy_matches_python_api(capsys, files):
    model = load_model(files["byte"])
    expected = generate_text(model, load_tokenizer("byte"), "Hello", max_tokens=30, temperature=0)
    code, out, err = run_cli(
        capsys,
        "generate",
        "--model",
        files["byte"],
        "--prompt",
        "Hello",
        "--max-tokens",
        30,
        "--temperature",
        0,
    )
    assert code == 0 and err == ""
    assert out == expected.text


def test_generate_world_tokenizer_is_the_default_for_65536(capsys, tmp_path):
    path = tmp_path / "world.pth"
    torch.save(random_v7_state_dict(n_layer=1, vocab_size=65536, dtype=torch.bfloat16), path)
    prompt = "User: hi 你好\n\nAssistant:"
    expected = generate_text(load_model(path), load_tokenizer("world"), prompt, max_tokens=12, temperature=0)
    code, out, _ = run_cli(
        capsys, "generate", "-m", path, "-p", prompt, "--max-tokens", 12, "--temperature", 0
    )
    assert code == 0 and out == expected.text and len(expected.tokens) > 0


def test_generate_prompt_file_stop_and_seed(capsys, files):
    model = load_model(files["byte"])
    tok = load_tokenizer("byte")
    full = generate_text(model, tok, "Once upon a time", max_tokens=40, temperature=0, stop_tokens=())
    stop = full.text[3:6]
    expected = generate_text(
        model, tok, "Once upon a time", max_tokens=40, temperature=0, stop_tokens=(), stop_strings=[stop]
    )
    args = ["generate", "-m", files["byte"], "--prompt-file", files["prompt"], "--max-tokens", 40]
    code, out, _ = run_cli(capsys, *args, "--temperature", 0, "--no-eot-stop", "--stop", stop)
    assert code == 0 and out == expected.text and stop not in out

    sampled = [*args, "--temperature", "0.9", "--top-p", "0.95", "--top-k", "50", "--seed", "7"]
    first = run_cli(capsys, *sampled)
    assert first[0] == 0 and first == run_cli(capsys, *sampled)


def test_generate_stats_and_dtype(capsys, files):
    code, out, err = run_cli(
        capsys, "generate", "-m", files["byte"], "-p", "Hi", "--max-tokens", 5, "--dtype", "bf16", "--stats"
    )
    assert code == 0
    assert "finish:" in err and "tok/s" in err


def test_generate_with_named_tokenizer(capsys, files):
    code, out, _ = run_cli(
        capsys, "generate", "-m", files["v97"], "-p", "A!", "--tokenizer", "byte", "--max-tokens", 5
    )
    assert code == 0


@pytest.mark.parametrize("version", ["4", "5.2", "6", "7"])
def test_info_and_greedy_generate_on_every_version(capsys, tmp_path, version):
    """`info` describes each version; greedy `generate` emits what the reference package decodes."""
    path = tmp_path / f"v{version}.pth"
    torch.save(random_state_dict(version, n_layer=2, n_embd=64, vocab_size=256, seed=11), path)
    code, out, _ = run_cli(capsys, "info", "--json", path)
    info = json.loads(out)
    assert code == 0 and (info["version"], info["n_layer"], info["n_embd"]) == (version, 2, 64)
    code, out, _ = run_cli(capsys, "info", path)
    assert code == 0 and f"RWKV-{version}" in out

    prompt, n_new = "To be, or", 24
    ref = reference_model(path, version)
    logits, state = reference_logits(ref, list(prompt.encode()))
    generated = []
    for _ in range(n_new):
        token = int(logits[-1].argmax())
        generated.append(token)
        logits, state = reference_logits(ref, [token], state)
    expected = bytes(generated).decode("utf-8", errors="replace")
    argv = ["generate", "-m", path, "-p", prompt, "--max-tokens", n_new, "--temperature", 0, "--no-eot-stop"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0 and err == ""
    assert out == expected


def test_generate_with_a_tokenizer_json(capsys, tmp_path):
    """--tokenizer PATH.json (a Hugging Face BPE file, as RWKV-4 Pile models use) drives generation."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(["To be, or not to be, that is the question."] * 50, trainer)
    tok_path = tmp_path / "tokenizer.json"
    bpe.save(str(tok_path))
    tokenizer = load_tokenizer(tok_path)
    model_path = tmp_path / "pile.pth"
    torch.save(random_state_dict("4", n_layer=2, n_embd=32, vocab_size=tokenizer.vocab_size), model_path)
    prompt = "To be, or not"
    expected = generate_text(load_model(model_path), tokenizer, prompt, max_tokens=10, temperature=0)
    code, out, err = run_cli(
        capsys, "generate", "-m", model_path, "-p", prompt, "--tokenizer", tok_path, "--max-tokens", 10,
        "--temperature", 0,
    )  # fmt: skip
    assert code == 0 and err == "" and out == expected.text
    assert tokenizer.encode(prompt) != list(prompt.encode())  # really the BPE, not bytes


def test_stop_escapes():
    assert cli.unescape(r"\n\nUser:") == "\n\nUser:"
    assert cli.unescape(r"a\tb\\n") == "a\tb\\n"
    assert cli.unescape("plain é") == "plain é"


def test_cli_defaults_match_the_library():
    assert cli.DEFAULT_MAX_TOKENS == infer.DEFAULT_MAX_TOKENS
    assert cli.DEFAULT_TEMPERATURE == infer.DEFAULT_TEMPERATURE
    assert cli.DEFAULT_TOP_P == infer.DEFAULT_TOP_P
    assert cli.DEFAULT_TOP_K == infer.DEFAULT_TOP_K
    assert cli.DEFAULT_PREFILL_CHUNK == infer.DEFAULT_PREFILL_CHUNK


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "name,words",
    [
        ("missing", ["no such file"]),
        ("text", ["not a checkpoint"]),
        ("truncated", ["truncated"]),
        ("unrelated", ["not an RWKV checkpoint"]),
        ("rwkv4_incomplete", ["missing", "RWKV-4", "key"]),
        ("rwkv51", ["RWKV-5.1", "not support"]),
    ],
)
@pytest.mark.parametrize("command", ["info", "generate"])
def test_bad_checkpoint_files(capsys, files, tmp_path, name, words, command):
    path = tmp_path / "does-not-exist.pth" if name == "missing" else files[name]
    argv = ["info", path] if command == "info" else ["generate", "-m", path, "-p", "hi"]
    code, out, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, *words)
    assert out == ""


@pytest.mark.parametrize(
    "extra,words",
    [
        (["-p", ""], ["empty prompt"]),
        (["-p", "é"], ["token id 195", "outside"]),  # byte 0xC3 is not in a 97-token vocabulary
        (["-p", "x", "--temperature", "-1"], ["temperature"]),
        (["-p", "x", "--top-p", "0"], ["top_p"]),
        (["-p", "x", "--top-p", "1.5"], ["top_p"]),
        (["-p", "x", "--stop", ""], ["--stop"]),
        (["-p", "x", "--tokenizer", "no-such-tokenizer"], ["unknown tokenizer"]),
        (["-p", "x", "--device", "no-such-device"], ["device"]),
        (["--prompt-file", "/no/such/prompt.txt"], ["prompt file"]),
    ],
)
def test_bad_generate_inputs(capsys, files, extra, words):
    args = ["generate", "-m", files["v97"], "--tokenizer", "byte", *extra]
    code, out, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, *words)


def test_prompt_file_not_utf8(capsys, files):
    code, _, err = run_cli(capsys, "generate", "-m", files["byte"], "--prompt-file", files["latin1"])
    assert_one_line_error(code, err, "not UTF-8")


def test_unknown_vocab_needs_a_tokenizer(capsys, files):
    code, _, err = run_cli(capsys, "generate", "-m", files["v97"], "-p", "hi")
    assert_one_line_error(code, err, "97", "--tokenizer")


def test_token_out_of_vocab_python_api(files):
    model = load_model(files["v97"])
    with pytest.raises(RwkvkitError, match="outside the vocabulary"):
        model(torch.tensor([[97]]))


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["generate", "-p", "x"],  # no --model
        ["generate", "-m", "m.pth"],  # no prompt
        ["generate", "-m", "m.pth", "-p", "x", "--prompt-file", "f"],  # both
        ["generate", "-m", "m.pth", "-p", "x", "--top-k", "-1"],
        ["generate", "-m", "m.pth", "-p", "x", "--max-tokens", "many"],
        ["generate", "-m", "m.pth", "-p", "x", "--dtype", "fp8"],
        ["info"],
    ],
)
def test_usage_errors_exit_2(capsys, argv):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and "usage:" in err and "Traceback" not in err


def test_help_and_version(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for command in ("generate", "info", "train"):
        assert command in out
    code, out, _ = run_cli(capsys, "generate", "--help")
    for flag in (
        "--model",
        "--prompt",
        "--prompt-file",
        "--max-tokens",
        "--temperature",
        "--top-p",
        "--top-k",
    ):
        assert flag in out
    for flag in ("--seed", "--tokenizer", "--stop", "--device", "--dtype"):
        assert flag in out
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.startswith("rwkvkit ")


def test_train_subcommand_is_registered(capsys):
    code, out, _ = run_cli(capsys, "train", "--help")
    assert code == 0 and "usage: rwkvkit train" in out


def test_keyboard_interrupt_exits_130(capsys, files, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_info, "run", interrupted)
    code, out, err = run_cli(capsys, "info", files["byte"])
    assert code == 130 and "Traceback" not in err


# ---------------------------------------------------------------------------------------------- processes


def _python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )


def test_help_does_not_import_torch():
    code = "import sys; from rwkvkit.cli import main; main(['--help']); print('torch' in sys.modules)"
    proc = _python("-c", code)
    assert proc.returncode == 0
    assert proc.stdout.strip().endswith("False")


def test_python_m_rwkvkit(files):
    ok = _python("-m", "rwkvkit", "info", str(files["byte"]))
    assert ok.returncode == 0 and "RWKV-7" in ok.stdout
    bad = _python("-m", "rwkvkit", "info", str(files["truncated"]))
    assert bad.returncode == 2 and bad.stdout == ""
    assert "Traceback" not in bad.stderr and bad.stderr.startswith("error: ")
    assert len(bad.stderr.strip().splitlines()) == 1
