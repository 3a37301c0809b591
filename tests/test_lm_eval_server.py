"""lm-evaluation-harness against ``rwkvkit serve``: its ``local-completions`` model with the remote
tokenizer (the server's /tokenizer_info, /tokenize, /detokenize) on a local multiple-choice task.

The log-likelihoods must equal the ones lm-eval gets through rwkvkit's native adapter (``--model
rwkvkit``, no server) and a log-softmax of one forward pass computed here; the accuracies must agree.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from checkpoints import random_state_dict
from test_server import _serve

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

MODEL = "tiny-eval"
DOCS = [
    {"ctx": "The capital of France is", "choices": [" Paris", " a small green frog"], "label": 0},
    {"ctx": "One, two,", "choices": [" three", " many"], "label": 0},
    {"ctx": "Colours: red and", "choices": [" blue", " 中文 🙂"], "label": 1},
    {"ctx": "Water is", "choices": [" wet", " dry", " a question of taste"], "label": 0},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lmeval-server")
    sd = random_state_dict("7", n_layer=2, n_embd=64, vocab_size=65536, seed=41)
    torch.save(sd, folder / "tiny.pth")
    (folder / "docs.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in DOCS))
    (folder / "srv_mc.yaml").write_text(
        "task: srv_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'docs.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{ctx}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\ntarget_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    server, served = _serve(sd, "world", None, None, 4, 16, 256, MODEL)
    yield folder, served
    served.close()
    server.__exit__()
    served.engine.shutdown()


def _evaluate(folder, model: str, model_args: str) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    import rwkvkit.eval_harness  # noqa: F401  (registers lm-eval's model "rwkvkit")

    manager = TaskManager(include_path=str(folder), include_defaults=False)
    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=["srv_mc"],
        task_manager=manager,
        batch_size=2,
        log_samples=True,
    )


def _loglikelihoods(result: dict) -> list[list[float]]:
    samples = sorted(result["samples"]["srv_mc"], key=lambda s: s["doc_id"])
    return [[float(resp[0][0]) for resp in s["resps"]] for s in samples]


def test_local_completions_equals_the_native_adapter_and_the_forward_pass(setup):
    folder, served = setup
    args = (
        f"model={MODEL},base_url={served.url}/v1/completions,tokenizer_backend=remote,"
        "tokenized_requests=True,num_concurrent=1,max_retries=1"
    )
    remote = _evaluate(folder, "local-completions", args)
    native = _evaluate(folder, "rwkvkit", f"pretrained={folder / 'tiny.pth'}")
    got, want = _loglikelihoods(remote), _loglikelihoods(native)
    assert [len(g) for g in got] == [len(d["choices"]) for d in DOCS]
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, abs=1e-4)
    assert remote["results"]["srv_mc"]["acc,none"] == native["results"]["srv_mc"]["acc,none"]

    tok = served.tokenizer
    for doc, scores in zip(DOCS, got, strict=True):
        head = tok.encode(doc["ctx"])
        for choice, score in zip(doc["choices"], scores, strict=True):
            whole = tok.encode(doc["ctx"] + choice)
            with torch.no_grad():
                logits, _ = served.ref(torch.tensor([whole]))
            logp = torch.log_softmax(logits[0].double(), dim=-1)
            expected = sum(float(logp[t - 1, whole[t]]) for t in range(len(head), len(whole)))
            assert score == pytest.approx(expected, abs=1e-4)
