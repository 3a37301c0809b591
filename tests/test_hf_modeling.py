"""rwkvkit models inside Hugging Face transformers (rwkvkit.hf.modeling), checked against rwkvkit itself.

The references are rwkvkit's own forward and hand-written loops over it: greedy decoding token by
token on the carried state, the shifted cross-entropy from log-softmax, the sum of log-probabilities
of a continuation. transformers' generate / pipeline, PEFT, lm-eval and TRL drive the wrapper; they
must reproduce those numbers, and generate must read one token per step after the prompt.
"""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from checkpoints import random_state_dict  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, pipeline  # noqa: E402

from rwkvkit.hf import RwkvkitConfig, RwkvkitForCausalLM  # noqa: E402
from rwkvkit.hf.tokenization_rwkv_world import RwkvWorldTokenizer  # noqa: E402
from rwkvkit.models.io import export_state_dict, model_from_state_dict, new_model  # noqa: E402
from rwkvkit.tokenizer.world import DEFAULT_VOCAB_PATH, WorldTokenizer  # noqa: E402

VERSIONS = ("4", "5.2", "6", "7")
EOS = 0


def small_model(version: str, seed: int = 1, vocab_size: int = 97):
    """A random rwkvkit model with trained-scale weights (tests/checkpoints.py), fp32."""
    return model_from_state_dict(random_state_dict(version, vocab_size=vocab_size, seed=seed))


def rwkvkit_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation by rwkvkit alone: the prompt once, then one argmax token per call on the
    carried state, stopping after the end-of-text token (as generate does)."""
    out = []
    with torch.no_grad():
        logits, state = model(torch.tensor([prompt]))
        for _ in range(n):
            token = int(logits[0, -1].argmax())
            out.append(token)
            if token == EOS:
                break
            logits, state = model(torch.tensor([[token]]), state)
    return out


def record_calls(model) -> list[tuple[int, ...]]:
    """The token shapes of every call of the rwkvkit model from now on."""
    shapes = []
    model.register_forward_pre_hook(lambda _module, args: shapes.append(tuple(args[0].shape)))
    return shapes


@pytest.fixture(scope="module")
def world_tok() -> RwkvWorldTokenizer:
    return RwkvWorldTokenizer(vocab_file=str(DEFAULT_VOCAB_PATH))


@pytest.fixture(scope="module")
def world_model():
    """A tiny RWKV-7 (L2 D64) with the World vocabulary, wrapped."""
    return RwkvkitForCausalLM.from_rwkvkit(small_model("7", seed=4, vocab_size=65536))


@pytest.mark.parametrize("version", VERSIONS)
def test_generate_greedy_is_rwkvkit_greedy_one_token_per_step(version):
    model = small_model(version)
    hf = RwkvkitForCausalLM.from_rwkvkit(model)
    prompt, n = [5, 9, 11, 3, 40], 8
    want = rwkvkit_greedy(model, prompt, n)
    shapes = record_calls(model)
    got = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n)
    assert got[0, len(prompt) :].tolist() == want
    # the prompt once, then one token per step on the carried state
    assert shapes == [(1, len(prompt))] + [(1, 1)] * (len(want) - 1)


def test_generate_batches_padding_beams_and_sampling():
    model = small_model("6", seed=2)
    hf = RwkvkitForCausalLM.from_rwkvkit(model)
    p1, p2, p3 = [5, 9, 11, 3], [7, 8, 20, 31], [44, 2]
    singles = [rwkvkit_greedy(model, p, 6) for p in (p1, p2, p3)]
    # a batch of equal-length prompts: each row as it would run alone
    got = hf.generate(torch.tensor([p1, p2]), do_sample=False, max_new_tokens=6)
    assert [row[4:].tolist() for row in got] == singles[:2]
    # a left-padded batch: the short prompt's row gives the same tokens as that prompt alone
    ids = torch.tensor([p1, [0, 0, *p3]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    got = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=6)
    assert [row[4:].tolist() for row in got] == [singles[0], singles[2]]
    # generate continues from a given state: the prompt's first tokens read before, the rest given
    with torch.no_grad():
        start = hf(torch.tensor([p1[:2]]), use_cache=True).state
    got = hf.generate(torch.tensor([p1[2:]]), state=start, do_sample=False, max_new_tokens=6)
    assert got[0, 2:].tolist() == singles[0]
    # beam search regroups the state rows: the same beams as without a cache (every step re-reads all)
    beams = dict(do_sample=False, num_beams=3, num_return_sequences=2, max_new_tokens=5)
    cached = hf.generate(torch.tensor([p1]), **beams)
    uncached = hf.generate(torch.tensor([p1]), use_cache=False, **beams)
    assert cached.tolist() == uncached.tolist()
    # sampling draws the same tokens from the carried state as from re-reading the sequence
    sample = dict(do_sample=True, top_k=20, temperature=1.5, max_new_tokens=6, num_return_sequences=3)
    torch.manual_seed(7)
    cached = hf.generate(torch.tensor([p2]), **sample)
    torch.manual_seed(7)
    uncached = hf.generate(torch.tensor([p2]), use_cache=False, **sample)
    assert cached.tolist() == uncached.tolist()


def test_forward_logits_loss_mask_and_gradients():
    model = small_model("5.2", seed=3)
    hf = RwkvkitForCausalLM.from_rwkvkit(model)
    tokens = torch.tensor([[3, 14, 15, 92, 65, 35], [27, 18, 28, 18, 28, 45]])
    labels = tokens.clone()
    labels[0, 2] = labels[1, 5] = -100
    with torch.no_grad():
        ref_logits, ref_state = model(tokens)
    out = hf(tokens, labels=labels, use_cache=True)
    torch.testing.assert_close(out.logits, ref_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.state.wkv, ref_state.wkv, rtol=0, atol=1e-6)
    # the shifted cross-entropy by hand: position t predicts labels[t + 1]
    logp = torch.log_softmax(ref_logits, dim=-1)
    terms = [-logp[b, t, labels[b, t + 1]] for b in range(2) for t in range(5) if labels[b, t + 1] != -100]
    torch.testing.assert_close(out.loss, torch.stack(terms).mean(), rtol=1e-6, atol=1e-6)
    out.loss.backward()  # gradients reach the rwkvkit weights
    assert model.blocks[0].att.key.weight.grad.abs().sum() > 0
    assert hf(tokens, return_dict=False)[0].shape == ref_logits.shape
    with torch.no_grad():
        # the returned state continues the sequences: the rest of the tokens read from it alone
        first = hf(tokens[:, :2], use_cache=True)
        torch.testing.assert_close(
            hf(tokens[:, 2:], state=first.state).logits, ref_logits[:, 2:], rtol=0, atol=1e-5
        )
        # the backbone (what TRL's fused head reads) gives the head's input
        hidden = hf.base_model(input_ids=tokens).last_hidden_state  # (B, T, C)
        torch.testing.assert_close(model.head(hidden).float(), ref_logits, rtol=0, atol=1e-5)
    # a left-padded row: its unmasked positions are those of the row alone, masked ones are zeros
    padded = torch.tensor([[0, 0, 0, 3, 14, 15]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1]])
    with torch.no_grad():
        got = hf(padded, attention_mask=mask).logits
        alone, _ = model(torch.tensor([[3, 14, 15]]))
    torch.testing.assert_close(got[:, 3:], alone, rtol=0, atol=1e-6)
    assert not got[:, :3].any()


def test_config_builds_the_official_init():
    config = RwkvkitConfig(version="7", n_layer=2, n_embd=64, vocab_size=97, head_size=16)
    assert (config.hidden_size, config.num_hidden_layers, config.tie_word_embeddings) == (64, 2, False)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (0, 0, 0)
    torch.manual_seed(0)
    hf = RwkvkitForCausalLM(config)
    torch.manual_seed(0)
    ref = new_model("7", 2, 64, 97, head_size=16)
    assert hf.rwkvkit_model.config == ref.config
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(hf.rwkvkit_model.state_dict()[key], value, rtol=0, atol=0)


def test_save_pretrained_and_auto_from_pretrained(tmp_path):
    model = small_model("7", seed=5)
    hf = RwkvkitForCausalLM.from_rwkvkit(model)
    hf.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert set(f.keys()) == {"model." + key for key in export_state_dict(model)}
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "rwkvkit"
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, RwkvkitConfig) and config.to_model_config() == model.config
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, RwkvkitForCausalLM)
    tokens = torch.tensor([[1, 2, 3, 50, 60, 70]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, model(tokens)[0], rtol=0, atol=0)


def test_pipeline_text_generation_is_rwkvkit_greedy(world_model, world_tok):
    prompt = "The Eiffel tower is in the city of"
    ids = WorldTokenizer().encode(prompt)
    assert world_tok(prompt)["input_ids"] == ids
    want = rwkvkit_greedy(world_model.rwkvkit_model, ids, 8)
    generator = pipeline("text-generation", model=world_model, tokenizer=world_tok)
    out = generator(prompt, max_new_tokens=8, do_sample=False, return_full_text=False)
    assert out[0]["generated_text"] == world_tok.decode(want, skip_special_tokens=True)


def test_peft_lora_trains_only_the_adapters():
    peft = pytest.importorskip("peft")
    model = small_model("7", seed=6)
    tokens = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        before = model(tokens)[0]
    targets = ["att.key", "att.value", "att.receptance", "att.output", "ffn.key", "ffn.value"]
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM")
    lora = peft.get_peft_model(RwkvkitForCausalLM.from_rwkvkit(model), config)
    trainable = {name: p for name, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    out = lora(input_ids=tokens, labels=tokens)
    torch.testing.assert_close(out.logits, before, rtol=0, atol=1e-6)  # lora_B starts at zero
    frozen = {name: p.detach().clone() for name, p in lora.named_parameters() if not p.requires_grad}
    start = {name: p.detach().clone() for name, p in trainable.items()}
    out.loss.backward()
    torch.optim.SGD(trainable.values(), lr=0.1).step()
    assert any(not torch.equal(p, start[name]) for name, p in trainable.items() if "lora_B" in name)
    assert all(torch.equal(p, frozen[name]) for name, p in lora.named_parameters() if name in frozen)


def rwkvkit_loglikelihood(model, world: WorldTokenizer, context: str, continuation: str) -> float:
    """Sum of log-softmax over the continuation's tokens, the continuation's tokens being what the whole
    text adds after the context's (lm-eval's split)."""
    whole, head = world.encode(context + continuation), world.encode(context)
    with torch.no_grad():
        logits, _ = model(torch.tensor([whole[:-1]]))
    logp = torch.log_softmax(logits[0], dim=-1)
    return float(sum(logp[t - 1, whole[t]] for t in range(len(head), len(whole))))


def test_lm_eval_multiple_choice_loglikelihoods(world_model, world_tok, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    docs = [
        {"ctx": "The capital of France is", "choices": [" Paris", " a small green frog"], "label": 0},
        {"ctx": "One, two,", "choices": [" three", " many"], "label": 0},
    ]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    (tmp_path / "rwkvkit_tiny.yaml").write_text(
        "task: rwkvkit_tiny\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{ctx}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        'target_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    lm = HFLM(pretrained=world_model, tokenizer=world_tok, batch_size=1, backend="causal")
    tasks = TaskManager(include_path=str(tmp_path), include_defaults=False)
    result = lm_eval.simple_evaluate(model=lm, tasks=["rwkvkit_tiny"], task_manager=tasks, log_samples=True)
    world = WorldTokenizer()
    samples = result["samples"]["rwkvkit_tiny"]
    assert len(samples) == 2
    for sample in samples:
        doc = sample["doc"]
        got = [resp[0] for resp in sample["filtered_resps"]]
        want = [
            rwkvkit_loglikelihood(world_model.rwkvkit_model, world, doc["ctx"], c) for c in doc["choices"]
        ]
        assert got == pytest.approx(want, abs=1e-4)
    assert 0 <= result["results"]["rwkvkit_tiny"]["acc,none"] <= 1


def test_trl_sft_lowers_the_loss(world_tok, tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    hf = RwkvkitForCausalLM.from_rwkvkit(small_model("7", seed=8, vocab_size=65536))
    texts = ["The quick brown fox jumps over the lazy dog.", "A stitch in time saves nine."] * 4
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=8,
        per_device_train_batch_size=2,
        learning_rate=3e-3,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        max_length=32,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=hf, args=args, train_dataset=Dataset.from_dict({"text": texts}), processing_class=world_tok
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 8
    assert losses[-1] < 0.7 * losses[0]
