"""Causal language models (model.task = "causal-lm"): tokens, loss, evaluation, every strategy.

Decoders are built from a config (a GPT-2 and a LLaMA architecture, random weights, the packaged
MiniLM tokenizer): no pretrained decoder installs from a package registry, so these tests show the
mechanics on real text from ../shared/data, not quality.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_config
from fedlora import codec
from fedlora.config import ConfigError
from fedlora.data import collate, load_task
from fedlora.factors import extract_factors, load_factors
from fedlora.model import (
    AdapterSpec,
    build_peft_model,
    check_device,
    initial_factors,
    load_adapter,
    load_tokenizer,
    merge_delta_into_base,
    skeleton_peft_model,
    write_adapter,
)
from fedlora.tasks.causal_maths import IGNORE

DECODERS = ["builtin:tiny-gpt2", "builtin:tiny-llama"]


def causal_config(tmp_path, **sections):
    """make_config's small run, on a tiny GPT-2 (unless ``model`` names another) as a causal LM."""
    sections["data"] = {"max_train_examples": 60, "max_test_examples": 16, **sections.get("data", {})}
    sections["model"] = {
        "name": "builtin:tiny-gpt2",
        "task": "causal-lm",
        "max_length": 64,
        **sections.get("model", {}),
    }
    return make_config(tmp_path, **sections)


def _random_factors(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = extract_factors(model)
    for m in f.modules.values():
        m.A = torch.randn(m.A.shape, generator=g) * 0.1
        m.B = torch.randn(m.B.shape, generator=g) * 0.1
    return f


# ------------------------------------------------------------------------------------ tokens
def test_labels_mask_exactly_the_prompt_and_padding(tmp_path, shared_data):
    cfg = causal_config(tmp_path)
    task = load_task(cfg)
    tok = load_tokenizer(cfg.model.name)
    idx = list(range(6))
    batch, labels = collate(task.train, idx)
    for j, i in enumerate(idx):
        n, p = len(task.train.input_ids[i]), int(task.train.prompt_lengths[i])
        assert (labels[j, :p] == IGNORE).all() and (labels[j, n:] == IGNORE).all()
        assert torch.equal(labels[j, p:n], batch["input_ids"][j, p:n])
        # What is scored is exactly " <label name>" and the end of the sequence.
        name = task.label_names[int(task.train.labels[i])]
        assert tok.decode(labels[j, p:n]) == tok.decode(
            tok(" " + name, add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
        )
        assert batch["attention_mask"][j].sum() == n


def test_alpaca_rows_score_the_output_only_and_missing_fields_are_named(tmp_path):
    rows = [
        {"instruction": f"Say the number {i}.", "input": "" if i % 2 else f"context {i}", "output": f"{i} {i}"}
        for i in range(20)
    ]
    folder = tmp_path / "alpaca"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = causal_config(
        tmp_path,
        data={"dataset": str(folder), "prompt_format": "alpaca", "test_split": ""},
        federation={"num_clients": 2},
    )
    task = load_task(cfg)
    tok = load_tokenizer(cfg.model.name)
    assert task.label_names == [] and task.train.answers is None
    for i in range(len(task.train)):
        ids, p = task.train.input_ids[i].tolist(), int(task.train.prompt_lengths[i])
        assert tok.decode(ids[:p]).endswith("# # # response :")
        assert ids[-1] == tok.sep_token_id
        response = tok.decode(ids[p:-1])
        assert response in {tok.decode(tok(r["output"], add_special_tokens=False)["input_ids"]) for r in rows}
    # A dataset without the configured fields: an error naming the key, the column and what is there.
    bad = causal_config(
        tmp_path,
        data={"dataset": str(folder), "prompt_format": "alpaca", "test_split": "", "output_column": "response"},
        federation={"num_clients": 2},
    )
    with pytest.raises(ConfigError, match=r"data.output_column.*'response'.*instruction, input, output"):
        load_task(bad)
    # Free-form rows carry no label to split clients by.
    with pytest.raises(ConfigError, match="data.partitioner.*carry no label"):
        causal_config(tmp_path, data={"dataset": str(folder), "prompt_format": "alpaca", "partitioner": "dirichlet"})


def test_chat_format_needs_a_chat_template_and_isolates_the_reply(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": f"hello {i}"}, {"role": "assistant", "content": f"hi {i}"}]}
        for i in range(10)
    ]
    folder = tmp_path / "chat"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    cfg = causal_config(tmp_path, data={"dataset": str(folder), "prompt_format": "chat"}, federation={"num_clients": 2})
    with pytest.raises(ConfigError, match="tokenizer has none"):
        load_task(cfg)  # the packaged tokenizer has no chat template
    # A tokenizer with a template (saved beside a decoder's config, as a local model folder has it).
    from fedlora.tasks.causal import encode

    tok = load_tokenizer(cfg.model.name)
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<assistant> {% endif %}"
    )
    try:
        enc = encode(tok, rows, cfg, [])
    finally:
        tok.chat_template = None
    for ids, p, row in zip(enc["ids"], enc["prompt_lengths"], rows):
        assert tok.decode(ids[:p]).endswith("< assistant >")
        assert tok.decode(ids[p:-1]).strip() == row["messages"][-1]["content"]


def test_too_long_prompts_error_or_lose_their_middle(tmp_path, shared_data):
    with pytest.raises(ConfigError, match=r"model.max_length.*600 tokens exceed builtin:tiny-gpt2's context of 512"):
        load_task(causal_config(tmp_path, model={"max_length": 600}))
    with pytest.raises(ConfigError, match=r"example \d+: its prompt \(\d+ tokens\).*data.truncate_prompts=true"):
        load_task(causal_config(tmp_path, model={"max_length": 24}, data={"truncate_prompts": False}))
    task = load_task(causal_config(tmp_path, model={"max_length": 24}))
    tok = load_tokenizer("builtin:tiny-gpt2")
    for ids, p in zip(task.train.input_ids, task.train.prompt_lengths):
        assert len(ids) <= 24
        assert tok.decode(ids[:p]).endswith("answer :")  # the cue the response follows survives


# ------------------------------------------------------------------------------------ model and wire
@pytest.mark.parametrize(
    "model_name, expected",
    [
        ("builtin:tiny-gpt2", {"c_attn", "c_proj", "c_fc"}),
        ("builtin:tiny-llama", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ],
)
def test_default_targets_and_codec_round_trip(tmp_path, model_name, expected):
    cfg = causal_config(tmp_path, model={"name": model_name})
    model = build_peft_model(cfg, 0, AdapterSpec.for_rank(cfg, 4))
    assert set(model.peft_config["default"].target_modules) == expected
    names = {n for n, _ in model.named_modules()}
    assert not any("lm_head" in n and "lora" in n for n in names)  # never the LM head
    f = _random_factors(model)
    assert not f.extras  # a causal LM sends no head
    back = codec.decode(
        codec.encode(f, "float32", modules=list(f.modules)),
        alpha=f.modules[next(iter(f.modules))].alpha,
        modules=list(f.modules),
    )
    for n, m in f.modules.items():
        assert torch.equal(back.modules[n].A, m.A) and torch.equal(back.modules[n].B, m.B)


@pytest.mark.parametrize("model_name", DECODERS)
def test_flora_merge_into_decoder_weights_equals_the_adapter(tmp_path, model_name):
    """FLoRA merges B @ A into the base; GPT-2's Conv1D stores weights transposed (fan_in_fan_out)."""
    cfg = causal_config(
        tmp_path, model={"name": model_name}, federation={"strategy": "flora"}, hetero={"client_ranks": [4]}
    )
    model = build_peft_model(cfg, 0, AdapterSpec.for_rank(cfg, 4))
    x = torch.randint(200, 3000, (2, 12))
    f = _random_factors(model, 3)
    load_factors(model, f)
    model.eval()
    with torch.no_grad():
        want = model(input_ids=x).logits
    from fedlora.lora_math import to_effective

    eff = to_effective(f)
    zero = extract_factors(model)
    for m in zero.modules.values():
        m.B = torch.zeros_like(m.B)
    load_factors(model, zero)
    merge_delta_into_base(model, eff)
    with torch.no_grad():
        got = model(input_ids=x).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    build_peft_model(cfg, 0, AdapterSpec.for_rank(cfg, 4))  # the next message gets the pristine base back
    load_factors(model, zero)
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=x).logits, want, atol=1e-4)


@pytest.mark.parametrize("model_name", DECODERS)
def test_adapter_written_from_factors_loads_in_peft(tmp_path, model_name):
    """The server writes the global adapter from factors and a weightless skeleton: PEFT loads it and
    predicts what the model holding those factors predicts."""
    cfg = causal_config(tmp_path, model={"name": model_name})
    spec = AdapterSpec.for_rank(cfg, 4)
    model = build_peft_model(cfg, 0, spec)
    f = _random_factors(model, 5)
    load_factors(model, f)
    skeleton = skeleton_peft_model(cfg, 0, spec)
    assert all(p.is_meta for p in skeleton.parameters())  # no base weights held
    assert torch.equal(
        initial_factors(skeleton, 9).modules[next(iter(f.modules))].A,
        initial_factors(model, 9).modules[next(iter(f.modules))].A,
    )
    path = write_adapter(tmp_path / "adapter", skeleton, f, model_name, [])
    loaded = load_adapter(path)
    x = torch.randint(200, 3000, (2, 10))
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=x).logits, model(input_ids=x).logits, atol=1e-5)


def test_memory_options_are_refused_on_a_cpu_and_modules_to_save_with_its_bytes(tmp_path):
    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match="bitsandbytes, which needs a CUDA GPU"):
        check_device(causal_config(tmp_path, model={"quantization": "4bit"}), cpu)
    with pytest.raises(ConfigError, match="float16' is for GPUs"):
        check_device(causal_config(tmp_path, model={"dtype": "float16"}), cpu)
    check_device(causal_config(tmp_path, model={"dtype": "bfloat16"}), cpu)
    with pytest.raises(ConfigError, match="quantized base cannot take exactly"):
        causal_config(tmp_path, model={"quantization": "8bit"}, federation={"strategy": "flora"})
    with pytest.raises(ConfigError, match="model.task.*must be one of classification, causal-lm"):
        causal_config(tmp_path, model={"task": "seq2seq"})
    with pytest.raises(ConfigError, match="builtin:tiny-gpt2.*is a decoder for model.task='causal-lm'"):
        build_peft_model(make_config(tmp_path, model={"name": "builtin:tiny-gpt2"}), 4, AdapterSpec(4, 8.0, 0.0, ()))
    cfg = causal_config(tmp_path, lora={"modules_to_save": ["lm_head"]})
    # The tied LM head is the 30522 x 64 embedding table: 1,953,408 parameters, float32 on the wire.
    with pytest.raises(ConfigError, match=r"lm_head would add 7,813,632 bytes"):
        build_peft_model(cfg, 0, AdapterSpec.for_rank(cfg, 4))


def test_quantization_on_cpu_stops_a_simulation_before_training(tmp_path, shared_data):
    from fedlora.simulate import simulate

    cfg = causal_config(tmp_path, model={"quantization": "4bit"}, train={"device": "cpu"})
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        simulate(cfg)
    assert not list((tmp_path / "runs").glob("*/metrics.jsonl"))


def test_bfloat16_base_trains_float32_factors(tmp_path, shared_data):
    from fedlora.partitions import client_data
    from fedlora.training import train_local

    cfg = causal_config(
        tmp_path, model={"dtype": "bfloat16", "gradient_checkpointing": True}, train={"local_steps": 2, "batch_size": 4}
    )
    model = build_peft_model(cfg, 0, AdapterSpec.for_rank(cfg, 4))
    load_factors(model, initial_factors(model, 1))
    base_dtypes = {p.dtype for n, p in model.named_parameters() if "lora_" not in n}
    assert base_dtypes == {torch.bfloat16}
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    before = [p.detach().clone() for p in params]
    res = train_local(model, params, client_data(cfg, 0).train, cfg.train, 1, torch.device("cpu"))
    assert res.steps == 2 and torch.isfinite(torch.tensor(res.loss))
    assert any(not torch.equal(a, b) for a, b in zip(before, params))


# ------------------------------------------------------------------------------------ federation
def test_two_clients_two_rounds_lower_held_out_loss(tmp_path, shared_data):
    """A real Flower simulation on AG News phrased as instructions: the loss on the held-out
    responses falls, and only LoRA factors (no head, no base weights) cross the wire."""
    from test_simulation import FACTOR_KEY, _array_keys, _run

    cfg = causal_config(
        tmp_path,
        model={"name": "builtin:tiny-llama"},
        run={"rounds": 2},
        data={"max_train_examples": 120, "max_test_examples": 32},
        federation={"num_clients": 2},
        train={"local_steps": 8, "batch_size": 8, "learning_rate": 5e-3},
    )
    run_dir, rows, grid = _run(cfg, engine="inprocess")  # the apps' learning and wire content, not the engine's
    loss = [r["server-loss"] for r in rows]
    assert loss[2] < loss[1] < loss[0], loss
    assert rows[2]["server-perplexity"] < rows[0]["server-perplexity"]
    assert 0.0 <= rows[2]["server-accuracy"] <= 1.0 and rows[2]["personal-loss"] > 0
    assert rows[2]["clients-accepted"] == 2
    for key in _array_keys(grid.sent + grid.received):
        assert FACTOR_KEY.match(key) and not key.startswith("head/"), key
    loaded = load_adapter(run_dir.path / "adapter")
    assert type(loaded).__name__ == "PeftModelForCausalLM"


@pytest.mark.parametrize("strategy", ["fedsa", "ffa", "hetlora", "flora", "flexlora"])
def test_every_strategy_runs_a_round_on_a_causal_lm(tmp_path, shared_data, strategy):
    """(FedIT: the two-round test above.)"""
    from test_simulation import _run

    hetero = {"client_ranks": [2, 4]} if strategy in ("hetlora", "flora", "flexlora") else {}
    # FFA runs with a server that holds no model (factors only, the 7B setting): it still saves the adapter.
    server_eval = strategy != "ffa"
    cfg = causal_config(
        tmp_path,
        run={"rounds": 1},
        hetero=hetero,
        federation={"num_clients": 2, "strategy": strategy, "server_eval": server_eval},
        data={"max_train_examples": 40, "max_test_examples": 8},
        train={"local_steps": 2, "batch_size": 8},
    )
    run_dir, rows, _ = _run(cfg, engine="inprocess")  # the strategies' code on causal LMs, not the engine's
    last = rows[-1]
    assert last["clients-accepted"] == 2 and not last["rejected"] and not last["rejected-evaluate"], last
    assert last["personal-loss"] > 0 and last.get("aggregation-error") is None
    if strategy != "fedsa" and server_eval:  # FedSA's B stays on the clients: the server holds no whole model
        assert last["server-loss"] > 0
    else:
        assert "server-loss" not in last
    adapter = json.loads((run_dir.path / "adapter" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "CAUSAL_LM"
    assert type(load_adapter(run_dir.path / "adapter")).__name__ == "PeftModelForCausalLM"


def test_an_examples_loss_does_not_depend_on_its_batch_mates(tmp_path, shared_data):
    """DP-SGD clips each example's gradient: that bounds one example's influence only if its loss
    (hence its gradient) is the same whichever examples share its batch."""
    from fedlora.tasks.causal_maths import causal_lm_loss

    cfg = causal_config(tmp_path)
    task = load_task(cfg)
    model = build_peft_model(cfg, 0, AdapterSpec.for_rank(cfg, 4))
    load_factors(model, _random_factors(model, 2))
    model.eval()

    def loss(idx):
        batch, labels = collate(task.train, idx)
        with torch.no_grad():
            return float(causal_lm_loss(model(**batch), labels))

    alone = [loss([i]) for i in range(5)]
    assert loss(list(range(5))) == pytest.approx(sum(alone) / 5, rel=1e-5)
    assert loss([0, 3]) == pytest.approx((alone[0] + alone[3]) / 2, rel=1e-5)


@pytest.mark.parametrize("model_name", DECODERS)
def test_example_level_dp_sgd_trains_a_decoder_with_opacus(tmp_path, shared_data, model_name):
    from fedlora.partitions import client_data
    from fedlora.privacy.example_level import DPSGDHook
    from fedlora.training import train_local

    cfg = causal_config(
        tmp_path, model={"name": model_name}, privacy={"example_dp": True}, train={"local_steps": 3, "batch_size": 8}
    )
    model = build_peft_model(cfg, 0, AdapterSpec.for_rank(cfg, 4))
    load_factors(model, initial_factors(model, 1))
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    hook = DPSGDHook(1.0, 1.0, 1e-5, noise_seed=3)
    res = train_local(model, params, client_data(cfg, 0).train, cfg.train, 1, torch.device("cpu"), hooks=[hook])
    assert res.steps == 3 and 0 < res.metrics["dp-sgd-epsilon"] < 20
    assert all(not torch.equal(a, b) for a, b in zip(before, params))  # noise reaches every factor
    assert not any(hasattr(p, "grad_sample") for p in params)  # Opacus unwrapped from the cached model
