"""The lm-evaluation-harness model ``rwkvkit`` (rwkvkit.eval_harness) on a small random RWKV-7 checkpoint.

References: the ``rwkv`` package (0.8.32, tests/reference.py) for every log-probability and for the
greedy tokens, computed here from its logits at each position; lm-eval's own HFLM over rwkvkit's
transformers wrapper for the multiple-choice log-likelihoods; tasks are local files written by the test.
"""

from __future__ import annotations

import functools
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from checkpoints import random_state_dict  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from reference import reference_logits, reference_model  # noqa: E402

from rwkvkit.errors import RwkvkitError  # noqa: E402
from rwkvkit.eval_harness import RwkvkitLM  # noqa: E402
from rwkvkit.infer import generate_text  # noqa: E402
from rwkvkit.models import model_from_state_dict  # noqa: E402
from rwkvkit.tokenizer import WorldTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS = [
    {"ctx": "The capital of France is", "choices": [" Paris", " a small green frog"], "label": 0},
    {"ctx": "One, two,", "choices": [" three", " many"], "label": 0},
    {"ctx": "Colours: red and", "choices": [" blue", " 中文 🙂"], "label": 1},
]
TEXTS = ["A longer text to score as a whole, read in several chunks of seven tokens. " * 2, "Short."]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    sd = random_state_dict("7", n_layer=2, n_embd=64, vocab_size=65536, seed=31)
    path = tmp_path_factory.mktemp("lmeval") / "tiny.pth"
    torch.save(sd, path)
    return path


@pytest.fixture(scope="module")
def ref(checkpoint):
    return reference_model(checkpoint)


@pytest.fixture(scope="module")
def lm(checkpoint) -> RwkvkitLM:
    # chunk_len 7: every sequence here runs in several model calls with the state carried
    return RwkvkitLM(pretrained=str(checkpoint), device="cpu", batch_size=2, chunk_len=7)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    """Two local tasks: multiple choice over DOCS, and rolling log-likelihood over TEXTS."""
    folder = tmp_path_factory.mktemp("tasks")
    (folder / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (folder / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (folder / "rwkvkit_mc.yaml").write_text(
        "task: rwkvkit_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'docs.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{ctx}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\ntarget_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (folder / "rwkvkit_rolling.yaml").write_text(
        "task: rwkvkit_rolling\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'texts.jsonl'}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"
    )
    return folder


def ref_logprobs(ref, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's log p(tokens[t + 1] | tokens[: t + 1]) and whether it is the argmax, for each t."""
    logits, _ = reference_logits(ref, tokens[:-1])  # (T - 1, V)
    logp = torch.log_softmax(logits.double(), dim=-1)
    targets = torch.tensor(tokens[1:])
    return logp[torch.arange(len(targets)), targets], logits.argmax(dim=-1) == targets


def ref_loglikelihood(ref, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    logp, greedy = ref_logprobs(ref, context + continuation)
    n = len(continuation)
    return float(logp[-n:].sum()), bool(greedy[-n:].all())


def ref_greedy(ref, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens by the reference, one forward per token, ending after the end-of-text id."""
    out: list[int] = []
    logits, state = reference_logits(ref, prompt)
    for _ in range(n):
        token = int(logits[-1].argmax())
        if token == 0:
            break
        out.append(token)
        logits, state = reference_logits(ref, [token], state)
    return out


def split_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of a causal request: the whole text's ids after the context's."""
    whole, head = tok.encode(context + continuation), tok.encode(context)
    return head, whole[len(head) :]


def test_multiple_choice_and_rolling_through_lm_eval(checkpoint, ref, tasks):
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    result = lm_eval.simple_evaluate(
        model="rwkvkit",  # by its registered name, from a model_args string as the command line does
        model_args=f"pretrained={checkpoint},chunk_len=5",
        tasks=["rwkvkit_mc", "rwkvkit_rolling"],
        task_manager=manager,
        batch_size=3,
        device="cpu",
        log_samples=True,
    )
    tok = WorldTokenizer()
    samples = result["samples"]["rwkvkit_mc"]
    assert len(samples) == len(DOCS)
    for sample in samples:
        doc = sample["doc"]
        got = [tuple(resp[0]) for resp in sample["resps"]]
        want = [ref_loglikelihood(ref, *split_pair(tok, doc["ctx"], c)) for c in doc["choices"]]
        assert [g[0] for g in got] == pytest.approx([w[0] for w in want], abs=1e-4)
        assert [g[1] for g in got] == [w[1] for w in want]
    rolling = result["samples"]["rwkvkit_rolling"]
    for sample in rolling:
        ids = tok.encode(sample["doc"]["text"])
        want = float(ref_logprobs(ref, [0, *ids])[0].sum())  # every token, the first after id 0
        assert sample["resps"][0][0] == pytest.approx(want, abs=1e-4)
    assert 0 <= result["results"]["rwkvkit_mc"]["acc,none"] <= 1


def test_loglikelihood_edge_cases_and_greedy(lm, ref):
    tok = WorldTokenizer()
    context = tok.encode("Once upon a time")
    greedy = ref_greedy(ref, context, 3)
    assert len(greedy) == 3
    requests = [
        (("a", "b"), context, greedy),  # the reference's own greedy tokens: is_greedy
        (("a", "c"), context, [greedy[0], (greedy[1] + 1) % 65536 or 1]),
        (("a", "e"), context, greedy[:1]),
        (("a", "d"), [0], tok.encode("no context")),  # these two share no context: one padded batch
        (("a", "f"), tok.encode("Another context, longer than that one"), tok.encode(" here")),
        (("a", "g"), context, []),  # nothing to score
    ]
    got = lm._loglikelihood_tokens(requests)
    want = [ref_loglikelihood(ref, ctx, cont) for _, ctx, cont in requests[:-1]] + [(0.0, True)]
    assert [g[0] for g in got] == pytest.approx([w[0] for w in want], abs=1e-4)
    assert [g[1] for g in got] == [w[1] for w in want] and got[0][1] and got[2][1] and not got[1][1]
    # an empty context is the end-of-text id 0 (lm-eval's prefix token)
    ((value, _),) = lm.loglikelihood([Instance("loglikelihood", {}, ("", " no context"), 0)])
    assert value == pytest.approx(ref_loglikelihood(ref, [0], tok.encode(" no context"))[0], abs=1e-4)
    assert lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("",), 0)]) == [0.0]


def test_generate_until_is_greedy_text_cut_at_the_stop(lm, ref, checkpoint):
    tok = WorldTokenizer()
    context = "The quick brown fox"
    model = model_from_state_dict(torch.load(checkpoint))
    full = generate_text(model, tok, context, max_tokens=24, temperature=0)
    assert full.tokens == ref_greedy(ref, tok.encode(context), 24)  # rwkvkit greedy is the reference's
    assert len(full.text) >= 12, full.text
    stop = full.text[6:9]
    cut = full.text[: full.text.index(stop)]
    requests = [
        Instance("generate_until", {}, (context, {"until": [stop], "max_gen_toks": 24}), 0),
        Instance(
            "generate_until", {}, (context, {"until": ["\x00no"], "do_sample": False, "max_tokens": 30}), 1
        ),
        Instance("generate_until", {}, (context, {"until": [], "max_gen_toks": 24, "temperature": 0.0}), 2),
        Instance("generate_until", {}, (context, {"until": stop, "max_new_tokens": 5}), 3),
    ]
    short = generate_text(model, tok, context, max_tokens=5, temperature=0).text
    got = lm.generate_until(requests)
    assert got[0] == cut
    assert got[2] == full.text
    assert got[1] == generate_text(model, tok, context, max_tokens=30, temperature=0).text
    assert got[3] == (short[: short.index(stop)] if stop in short else short)
    # sampling with a seed is repeatable
    sampled = {"until": [], "do_sample": True, "temperature": 1.0, "top_k": 5, "seed": 3, "max_gen_toks": 8}
    assert (
        lm.generate_until([Instance("generate_until", {}, (context, sampled), 0)] * 2)
        == [
            generate_text(model, tok, context, max_tokens=8, temperature=1.0, top_k=5, top_p=1.0, seed=3).text
        ]
        * 2
    )


def test_native_adapter_agrees_with_hflm_over_the_transformers_wrapper(lm):
    pytest.importorskip("transformers")
    from lm_eval.models.huggingface import HFLM

    from rwkvkit.hf import RwkvkitForCausalLM
    from rwkvkit.hf.tokenization_rwkv_world import RwkvWorldTokenizer
    from rwkvkit.tokenizer.world import DEFAULT_VOCAB_PATH

    wrapped = RwkvkitForCausalLM.from_rwkvkit(lm.model)
    hf = HFLM(
        pretrained=wrapped, tokenizer=RwkvWorldTokenizer(vocab_file=str(DEFAULT_VOCAB_PATH)), batch_size=1
    )
    requests = [
        Instance("loglikelihood", {}, (doc["ctx"], choice), i)
        for i, doc in enumerate(DOCS)
        for choice in doc["choices"]
    ]
    native, other = lm.loglikelihood(requests), hf.loglikelihood(requests)
    assert [n[0] for n in native] == pytest.approx([o[0] for o in other], abs=1e-4)
    assert [n[1] for n in native] == [o[1] for o in other]


def test_chat_template_and_bad_arguments(lm, checkpoint):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert lm.apply_chat_template(chat) == "System: Be brief.\n\nUser: Hi\n\nAssistant:"
    assert lm.apply_chat_template(chat, add_generation_prompt=False) == "System: Be brief.\n\nUser: Hi"
    with pytest.raises(RwkvkitError, match="dtype"):
        RwkvkitLM(pretrained=str(checkpoint), dtype="int3")
    with pytest.raises(RwkvkitError, match="batch_size"):
        RwkvkitLM(pretrained=str(checkpoint), batch_size=0, device="cpu")
    with pytest.raises(RwkvkitError, match="no such file"):
        RwkvkitLM(pretrained=str(checkpoint) + ".missing", device="cpu")
    with pytest.raises(RwkvkitError, match="repetition_penalty"):
        lm.generate_until(
            [Instance("generate_until", {}, ("x", {"until": [], "repetition_penalty": 1.1}), 0)]
        )


def test_command_line_and_lazy_import(checkpoint, tasks, tmp_path, monkeypatch, capsys):
    lazy = "import sys, rwkvkit; assert 'lm_eval' not in sys.modules, 'import rwkvkit imported lm_eval'"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", lazy], check=True, env=env, timeout=120)

    # python -m rwkvkit.eval_harness ..., run here (runpy, as -m does) to skip a second start-up; lm-eval's
    # command line indexes its thousands of built-in tasks first, which only this local task needs not
    import lm_eval.tasks

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", functools.partial(TaskManager, include_defaults=False))
    out = tmp_path / "out"
    args = [
        "--model", "rwkvkit", "--model_args", f"pretrained={checkpoint}",
        "--tasks", "rwkvkit_mc", "--include_path", str(tasks), "--device", "cpu", "--batch_size", "2",
        "--output_path", str(out),
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["python -m rwkvkit.eval_harness", *args])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("rwkvkit.eval_harness", run_name="__main__")
    assert exit_info.value.code == 0
    (results,) = list(out.rglob("results_*.json"))
    assert 0 <= json.loads(results.read_text())["results"]["rwkvkit_mc"]["acc,none"] <= 1

    # a bad checkpoint: one line on stderr and exit status 2
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["lm_eval", *args[:3], f"pretrained={checkpoint}.missing", *args[4:]])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("rwkvkit.eval_harness", run_name="__main__")
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after lm-eval's own log lines
    assert last.startswith("error: no such file") and last.endswith(".missing"), last
