"""Continual learning on the clients (the pure maths: test_continual_maths.py): the task LoRAs in the forward pass,
the client-state store across tasks, the accuracy matrix, and a federated task sequence end to end."""

from __future__ import annotations

import pytest
import torch

from conftest import SHARED_DATA, make_config
from tiny_model import hook_context


def test_a_task_cue_precedes_every_input_and_must_leave_room_for_the_text(tmp_path, shared_data):
    from fedlora.config import ConfigError
    from fedlora.data import load_task
    from fedlora.model import load_tokenizer

    plain = load_task(make_config(tmp_path))
    cued_cfg = make_config(tmp_path, data={"instruction": "Topic? Option: {labels}."})
    cued = load_task(cued_cfg)
    tok = load_tokenizer(cued_cfg.model.name, "")
    cue = tok("Topic? Option: " + ", ".join(cued.label_names) + ".")["input_ids"][:-1]  # without [SEP]
    assert all(x.tolist()[: len(cue)] == cue for x in cued.train.input_ids)
    assert not all(x.tolist()[: len(cue)] == cue for x in plain.train.input_ids)
    assert torch.equal(cued.train.labels, plain.train.labels)
    # a task sequence: each task's own cue (its own label names), else data.instruction
    from fedlora.continual.tasks import task_config, task_test

    raw, C = _continual(tmp_path)
    raw["data"]["instruction"] = "Option: {labels}."
    raw["model"]["max_length"] = 96  # dbpedia's 14 options take 40 tokens
    raw["continual"]["tasks"][1]["instruction"] = "Topic of this paragraph? Option: {labels}."
    seq = C.from_dict(raw)
    assert task_config(seq, 0).data.instruction == "Option: {labels}."
    dbpedia = load_task(task_config(seq, 1))
    cue = tok("Topic of this paragraph? Option: " + ", ".join(dbpedia.label_names) + ".")["input_ids"][:-1]
    assert all(x.tolist()[: len(cue)] == cue for x in task_test(seq, 1).input_ids)
    with pytest.raises(ConfigError, match=r"data.instruction.*leaving no room"):
        load_task(make_config(tmp_path, data={"instruction": "Option: {labels} " * 8}))
    with pytest.raises(ConfigError, match=r"data.instruction.*\{labels\}"):
        make_config(tmp_path, data={"instruction": "{label}"})
    with pytest.raises(ConfigError, match=r"data.instruction.*prompt_template"):
        make_config(tmp_path, model={"name": "builtin:tiny-gpt2", "task": "causal-lm"}, data={"instruction": "x"})


# ------------------------------------------------------------------------------------ forward pass
def _model(tmp_path, method="inclora", tasks=3, router="input-keys"):
    from fedlora.model import AdapterSpec, build_peft_model

    cfg = make_config(tmp_path)
    cfg.continual.method = method
    cfg.continual.amlora_router = router
    cfg.continual.head = "trainable"
    from fedlora.config import ContinualTask

    cfg.continual.tasks = [ContinualTask(name=f"t{i}", dataset=str(SHARED_DATA / "agnews")) for i in range(tasks)]
    spec = AdapterSpec(rank=4, alpha=8.0, dropout=0.0, target_modules=("query", "value"))
    return cfg, build_peft_model(cfg, 4, spec)


def _random_past(model, n: int, seed: int = 0):
    from fedlora.factors import ADAPTER, LoraFactors, ModuleFactors, lora_layers

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mods = {}
        for name, layer in lora_layers(model):
            r, d = layer.lora_A[ADAPTER].weight.shape
            o = layer.lora_B[ADAPTER].weight.shape[0]
            mods[name] = ModuleFactors(
                A=torch.randn(r, d, generator=g) * 0.1, B=torch.randn(o, r, generator=g) * 0.1, alpha=float(r)
            )
        out.append(LoraFactors(modules=mods))
    return out


def test_sum_of_task_loras_in_forward_equals_an_explicit_computation(tmp_path):
    from fedlora.continual.mixing import TaskLoraMixer
    from fedlora.factors import lora_layers

    _, model = _model(tmp_path)
    model.eval()
    past = _random_past(model, 2)
    name, layer = next(iter(lora_layers(model)))
    x = torch.randn(2, 5, layer.base_layer.in_features)
    plain = layer(x)
    mixer = TaskLoraMixer(model, past)
    mixed = layer(x)
    explicit = plain + sum(p.modules[name].scaling * (x @ p.modules[name].A.T @ p.modules[name].B.T) for p in past)
    assert torch.allclose(mixed, explicit, atol=1e-5)
    mixer.remove()
    assert torch.equal(layer(x), plain)  # the cached model is restored exactly


def test_past_task_loras_see_the_same_dropped_input_as_the_new_lora_in_training(tmp_path):
    """O-LoRA's lora.py: lora_dropout is applied to the input once and the result feeds both the past
    (lora_A/B) and the new (loranew_A/B) factors."""
    from fedlora.continual.mixing import TaskLoraMixer
    from fedlora.factors import ADAPTER, lora_layers
    from fedlora.model import AdapterSpec, build_peft_model

    cfg, _ = _model(tmp_path)
    model = build_peft_model(cfg, 4, AdapterSpec(rank=4, alpha=8.0, dropout=0.5, target_modules=("query", "value")))
    model.train()
    past = _random_past(model, 2)
    name, layer = next(iter(lora_layers(model)))
    with torch.no_grad():
        layer.lora_B[ADAPTER].weight.normal_(0, 0.1)  # a non-zero current LoRA too
    seen: list[torch.Tensor] = []
    spy = layer.lora_dropout[ADAPTER].register_forward_hook(lambda m, a, out: seen.append(out))
    mixer = TaskLoraMixer(model, past)
    x = torch.randn(2, 5, layer.base_layer.in_features)
    with torch.no_grad():
        mixed = layer(x)
        d = seen[-1]
        assert not torch.equal(d, x)  # dropout 0.5 did drop something
        a, b, s = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight, layer.scaling[ADAPTER]
        expected = (
            layer.base_layer(x)
            + s * (d @ a.T @ b.T)
            + sum(p.modules[name].scaling * (d @ p.modules[name].A.T @ p.modules[name].B.T) for p in past)
        )
        on_raw = (
            layer.base_layer(x)
            + s * (d @ a.T @ b.T)
            + sum(p.modules[name].scaling * (x @ p.modules[name].A.T @ p.modules[name].B.T) for p in past)
        )
    assert torch.allclose(mixed, expected, atol=1e-5)
    assert not torch.allclose(mixed, on_raw, atol=1e-3)  # the former behaviour: past LoRAs on the raw input
    spy.remove()
    mixer.remove()


@pytest.mark.parametrize("router", ["input-keys", "lora-outputs"])
def test_amlora_attention_sums_to_one_and_its_l1_term_reaches_the_loss(tmp_path, router):
    from fedlora.continual.hooks import AmLoraTraining
    from fedlora.continual.mixing import TaskLoraMixer, selector_of
    from fedlora.continual.penalties import attention_l1
    from fedlora.factors import lora_layers

    _, model = _model(tmp_path, "amlora", router=router)
    assert selector_of(model) is not None
    model.train()
    past = _random_past(model, 2)
    mixer = TaskLoraMixer(model, past, "attention")
    name, layer = next(iter(lora_layers(model)))
    layer(torch.randn(3, 4, layer.base_layer.in_features))
    (att,) = mixer.attention
    assert att.shape[-1] == 1 + 3  # the zero LoRA, two finished tasks, the current one
    assert torch.allclose(att.sum(-1), torch.ones(att.shape[:-1]))
    hook = AmLoraTraining(mixer, 0.5)
    base_loss = torch.tensor(1.0)
    with_l1 = hook.loss(None, base_loss)
    assert float(with_l1.detach()) == pytest.approx(1.0 + 0.5 * float(attention_l1(att).detach()))
    assert float(with_l1.detach()) > 1.0 and mixer.attention == []
    with_l1.backward()  # the selector learns from the L1 term
    sel = selector_of(model)
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in sel.parameters())
    mixer.remove()


def test_amlora_routing_is_the_mean_attention_of_evaluation_forwards_only(tmp_path):
    """The routing measurement (#40): the mean over layers and positions of the attention each slot
    gets, counted in evaluation when asked, never in training; a selector whose bias favours one
    task's slot routes there."""
    from fedlora.continual.mixing import selector_of

    _, model = _model(tmp_path, "amlora", router="lora-outputs")
    past = _random_past(model, 2)
    sel = selector_of(model)
    before = {key: b.detach().clone() for key, b in sel.bias.items()}  # the model is cached: put it back after
    with torch.no_grad():
        for key in sel.bias:
            sel.bias[key][2] = 20.0  # slot 2: the second finished task (index 0 is the zero LoRA)
    try:
        _measure_routing(model, past)
    finally:
        with torch.no_grad():
            for key, b in before.items():
                sel.bias[key].copy_(b)


def test_input_keys_route_each_tasks_inputs_to_its_lora(tmp_path):
    """The input-key router (#40): the current task's moments come from the training forwards and are
    what the client stores in its slot; in evaluation an input goes to the task whose moments it fits."""
    from fedlora.continual.mixing import TaskLoraMixer, selector_of
    from fedlora.continual.routing import moments, pooled_inputs
    from fedlora.factors import lora_layers

    _, model = _model(tmp_path, "amlora")
    sel = selector_of(model)
    past = _random_past(model, 2)
    name, layer = next(iter(lora_layers(model)))
    key = name.replace(".", "__")
    d = layer.base_layer.in_features
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(3, d, generator=g) * 2

    def inputs(t: int, n: int = 8) -> torch.Tensor:
        return centres[t] + 0.5 * torch.randn(n, 5, d, generator=g)

    mixer = TaskLoraMixer(model, past, "attention")
    try:
        with torch.no_grad():  # the finished tasks' slots, as their clients measured them
            for t in range(2):
                s1, s2, n = moments(pooled_inputs(inputs(t, 64), None))
                sel.key_mean[key][t], sel.key_second[key][t] = s1 / n, s2 / n
        model.train()
        seen = [inputs(2), inputs(2)]
        for x in seen:
            layer(x)
        mixer.attention.clear()
        mixer.store_keys()  # slot 2, the current task: exactly the moments of what it trained on
        s1, s2, n = moments(pooled_inputs(torch.cat(seen), None))
        assert torch.allclose(sel.key_mean[key][2].double(), s1 / n, atol=1e-5)
        assert torch.allclose(sel.key_second[key][2].double(), s2 / n, atol=1e-4)
        model.eval()
        mixer.measuring = True
        for t in range(3):
            mixer.reset_routing()
            with torch.no_grad():
                layer(inputs(t))
            routing = mixer.routing()
            assert len(routing) == 4 and max(range(4), key=routing.__getitem__) == t + 1 and routing[t + 1] > 0.5
            assert mixer.routing_count == 8  # one attention per input, not per position
    finally:
        mixer.remove()
        with torch.no_grad():
            for p in sel.statistics():
                p.zero_()


def test_input_key_training_measures_the_masked_moments_and_never_trains_them(tmp_path, shared_data):
    """Through the training loop and the whole model: the hook takes the moments out of the optimizer,
    the mixer pools over the real tokens (the model's attention mask), and the stored slot is the mean
    of what the adapted layer saw; the finished task's slot is left as it came, the zero logit trains."""
    from dataclasses import replace

    from fedlora.continual.hooks import AmLoraTraining
    from fedlora.continual.mixing import TaskLoraMixer, selector_of
    from fedlora.continual.routing import moments, pooled_inputs
    from fedlora.data import load_task
    from fedlora.factors import lora_layers
    from fedlora.training import train_local

    cfg, model = _model(tmp_path, "amlora")
    sel = selector_of(model)
    name, layer = next(iter(lora_layers(model)))
    key = name.replace(".", "__")
    with torch.no_grad():
        sel.key_mean[key][0] = 0.25
        sel.key_second[key][0] = 1.0
    for p in sel.statistics():  # as set_trainable leaves them: the selector is a trained part
        p.requires_grad_(True)
    zero_before = sel.zero[key].detach().clone()
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []
    masks: list[torch.Tensor] = []
    spies = [
        model.register_forward_pre_hook(lambda m, a, kw: masks.append(kw["attention_mask"]), with_kwargs=True),
        layer.register_forward_pre_hook(lambda m, a: captured.append((a[0].detach(), masks[-1]))),
    ]
    mixer = TaskLoraMixer(model, _random_past(model, 1), "attention")
    try:
        tc = replace(cfg.train, local_steps=3, batch_size=4, learning_rate=1e-3, weight_decay=0.0)
        params = [p for p in model.parameters() if p.requires_grad]
        cfg.model.max_length = 128  # room for texts of different lengths: padding in a batch
        train_local(model, params, load_task(cfg).train, tc, 0, torch.device("cpu"), [AmLoraTraining(mixer, 0.1, 0.05)])
        assert not any(p.requires_grad for p in sel.statistics())
        assert len(captured) == 3 and any(bool((m == 0).any()) for _, m in captured)  # padding was there
        total = [moments(pooled_inputs(x, m)) for x, m in captured]
        n = sum(c for *_, c in total)
        assert torch.allclose(sel.key_mean[key][1].double(), sum(s for s, _, _ in total) / n, atol=1e-5)
        assert torch.allclose(sel.key_second[key][1].double(), sum(s for _, s, _ in total) / n, atol=1e-4)
        assert torch.all(sel.key_mean[key][0] == 0.25) and torch.all(sel.key_second[key][0] == 1.0)
        assert float((sel.zero[key].detach() - zero_before).abs()) > 0.05  # the L1 term moved it, at its rate
    finally:
        mixer.remove()
        for s in spies:
            s.remove()
        with torch.no_grad():
            for p in sel.statistics():
                p.zero_()
            sel.zero[key].copy_(zero_before)


def _measure_routing(model, past) -> None:
    from fedlora.continual.mixing import TaskLoraMixer
    from fedlora.factors import lora_layers

    mixer = TaskLoraMixer(model, past, "attention")
    _, layer = next(iter(lora_layers(model)))
    x = torch.randn(3, 4, layer.base_layer.in_features)
    model.eval()
    layer(x)
    assert mixer.routing() == []  # not measuring: nothing counted
    mixer.measuring = True
    with torch.no_grad():
        layer(x)
        layer(x[:1])
    routing = mixer.routing()
    assert len(routing) == 1 + 3 and sum(routing) == pytest.approx(1.0)
    assert routing[2] > 0.99 and mixer.routing_count == 3 * 4 + 1 * 4
    model.train()
    layer(x)  # a training forward feeds the L1 term, not the measurement
    assert mixer.routing_count == 16
    mixer.reset_routing()
    assert mixer.routing() == []
    mixer.remove()


def test_a_federated_amlora_run_reports_its_routing_after_every_task(tmp_path, shared_data):
    import json

    from fedlora.config import FedLoraConfig
    from fedlora.simulate import simulate

    raw, _ = _continual(tmp_path, "amlora")
    raw["data"].update(max_train_examples=60, max_test_examples=30)
    raw["federation"].update(num_clients=2, min_train_clients=2, min_evaluate_clients=2)
    run = simulate(FedLoraConfig.from_dict(raw), engine="inprocess").path
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    stages = [r["amlora-routing"] for r in rows if r.get("amlora-routing")]
    assert [list(s) for s in stages] == [["agnews"], ["agnews", "dbpedia"]]
    assert [len(v) for v in stages[1].values()] == [3, 3]  # the zero LoRA and two task LoRAs
    assert all(sum(v) == pytest.approx(1.0) for s in stages for v in s.values())
    summary = json.loads((run / "summary.json").read_text())["continual"]
    assert [s["after"] for s in summary["amlora-routing"]] == ["agnews", "dbpedia"]
    assert (run / "amlora-routing.png").exists()


def test_amlora_selector_trains_at_its_own_learning_rate_and_the_loras_at_theirs(tmp_path, shared_data):
    from dataclasses import replace

    from fedlora.continual.hooks import AmLoraTraining
    from fedlora.continual.mixing import TaskLoraMixer, selector_of
    from fedlora.data import load_task
    from fedlora.factors import ADAPTER, lora_layers
    from fedlora.training import train_local

    cfg, _ = _model(tmp_path, "amlora")
    data = load_task(cfg).train
    tc = replace(cfg.train, local_steps=4, batch_size=8, learning_rate=1e-3, weight_decay=0.0)
    moved = {}
    for selector_lr in (0.0, 0.05):
        _, model = _model(tmp_path, "amlora", router="lora-outputs")
        mixer = TaskLoraMixer(model, _random_past(model, 2), "attention")
        sel = selector_of(model)
        lora_b = [layer.lora_B[ADAPTER].weight for _, layer in lora_layers(model)]
        before_sel = [p.detach().clone() for p in sel.parameters()]
        before_b = [p.detach().clone() for p in lora_b]
        params = [p for p in model.parameters() if p.requires_grad]
        train_local(
            model,
            params,
            data,
            tc,
            seed=0,
            device=torch.device("cpu"),
            hooks=[AmLoraTraining(mixer, 0.01, selector_lr)],
        )
        assert mixer.attention == []  # read and cleared every step: no graph kept across steps
        mixer.remove()
        moved[selector_lr] = (
            max(float((p.detach() - b).abs().max()) for p, b in zip(sel.parameters(), before_sel)),
            max(float((p.detach() - b).abs().max()) for p, b in zip(lora_b, before_b)),
        )
    # AdamW moves a parameter by about its rate per step: 4 steps at 1e-3 leave the selector near
    # uniform attention; its own rate moves it; the LoRAs keep train.learning_rate either way.
    assert moved[0.0][0] <= 4 * 1e-3 * 1.05
    assert moved[0.05][0] > 0.05 and moved[0.05][0] > 10 * moved[0.0][0]
    assert 0 < moved[0.05][1] <= 4 * 1e-3 * 1.05 and 0 < moved[0.0][1] <= 4 * 1e-3 * 1.05
    # The client installs the hook at amlora_l1 = 0 too, else the recorded attention piles up.
    from fedlora.continual.client import method_hooks

    cfg.continual.amlora_l1 = 0.0
    (hook,) = method_hooks(cfg, mixer, [])
    assert isinstance(hook, AmLoraTraining) and hook.lam == 0.0


def test_olora_penalty_hook_adds_lambda_times_the_formula(tmp_path):
    from fedlora.continual.hooks import OLoraPenalty
    from fedlora.factors import ADAPTER, lora_layers

    _, model = _model(tmp_path, "olora")
    past = _random_past(model, 2)
    past_a = {n: torch.cat([p.modules[n].A for p in past]) for n in past[0].modules}
    hook = OLoraPenalty(past_a, lambda1=0.5, lambda2=0.1, form="abs")
    ctx = hook_context(model, [], device=torch.device("cpu"), target_steps=1)
    hook.begin(ctx)
    layers = dict(lora_layers(model))
    orth = sum(float((past_a[n] @ layers[n].lora_A[ADAPTER].weight.detach().T).abs().sum()) for n in past_a)
    l2 = sum(
        float(layers[n].lora_A[ADAPTER].weight.detach().norm())
        + float(layers[n].lora_B[ADAPTER].weight.detach().norm())
        for n in layers
    )
    out = hook.loss(ctx, torch.tensor(2.0))
    assert float(out.detach()) == pytest.approx(2.0 + 0.5 * orth + 0.1 * l2, rel=1e-5)
    assert hook.end(ctx)["olora-orthogonality"] == pytest.approx(orth, rel=1e-5)


# ------------------------------------------------------------------------------------ config
def _continual(tmp_path, method="olora", strategy="fedit", rounds=(1, 1), **extra):
    from fedlora.config import FedLoraConfig

    cfg = make_config(tmp_path)
    raw = cfg.to_dict()
    raw["run"]["rounds"] = sum(rounds)
    raw["federation"]["strategy"] = strategy
    raw["continual"] = {
        "method": method,
        "tasks": [
            {"name": "agnews", "dataset": str(SHARED_DATA / "agnews"), "rounds": rounds[0]},
            {"name": "dbpedia", "dataset": str(SHARED_DATA / "dbpedia"), "rounds": rounds[1]},
        ],
        **extra,
    }
    for section, values in extra.pop("sections", {}).items() if "sections" in extra else []:
        raw[section].update(values)
    return raw, FedLoraConfig


def test_bad_task_lists_and_impossible_combinations_fail_before_training(tmp_path, shared_data):
    from fedlora.config import ConfigError

    raw, C = _continual(tmp_path)
    C.from_dict(raw)  # the valid one
    bad = dict(raw, continual={**raw["continual"], "tasks": [{"name": "x", "dataset": str(tmp_path / "nowhere")}]})
    bad["run"] = {**raw["run"], "rounds": 1}
    with pytest.raises(ConfigError, match=r"continual.tasks\[0\].dataset.*does not exist"):
        C.from_dict(bad)
    no_label = dict(
        raw,
        continual={
            **raw["continual"],
            "tasks": [{"name": "x", "dataset": str(SHARED_DATA / "agnews"), "label_column": ""}],
        },
    )
    no_label["run"] = {**raw["run"], "rounds": 1}
    with pytest.raises(ConfigError, match=r"label_column"):
        C.from_dict(no_label)
    typo = dict(raw, continual={**raw["continual"], "tasks": [{"name": "x", "datset": "y"}]})
    with pytest.raises(ConfigError, match=r"unknown config key 'continual.tasks\[0\].datset'"):
        C.from_dict(typo)
    with pytest.raises(ConfigError, match=r"run.rounds.*set run.rounds = 2"):
        C.from_dict(dict(raw, run={**raw["run"], "rounds": 3}))
    for strategy, words in (("fedsa", "keeps every client's B private"), ("flora", "merges each round")):
        with pytest.raises(ConfigError, match=words):
            C.from_dict(dict(raw, federation={**raw["federation"], "strategy": strategy}))
    with pytest.raises(ConfigError, match="DyLoRA"):
        C.from_dict(dict(raw, dylora={"enabled": True}))
    with pytest.raises(ConfigError, match="Opacus"):
        C.from_dict(dict(raw, privacy={"example_dp": True, "example_noise_multiplier": 1.0}))
    with pytest.raises(ConfigError, match="continual.method"):
        C.from_dict(dict(raw, continual={**raw["continual"], "method": "gem"}))
    am = dict(raw, continual={**raw["continual"], "method": "amlora"})
    with pytest.raises(ConfigError, match="continual.amlora_router.*must be one of input-keys, lora-outputs"):
        C.from_dict(dict(am, continual={**am["continual"], "amlora_router": "keys"}))
    with pytest.raises(ConfigError, match="continual.amlora_temperature.*must be > 0"):
        C.from_dict(dict(am, continual={**am["continual"], "amlora_temperature": 0.0}))
    dp = {"client_dp": True, "client_noise_multiplier": 1.0}
    with pytest.raises(ConfigError, match="amlora_router.*moments of each client's inputs.*'lora-outputs'"):
        C.from_dict(dict(am, privacy=dp))
    C.from_dict(dict(am, privacy=dp, continual={**am["continual"], "amlora_router": "lora-outputs"}))


def test_a_task_order_puts_the_task_tables_in_that_order_once_and_for_all(tmp_path, shared_data):
    """continual.order (O-LoRA's orders of one task pool): the tables are reordered on load, the saved
    config loads to the same order, and an order that is not a permutation of the tasks is refused."""
    from fedlora.config import ConfigError

    raw, C = _continual(tmp_path, "inclora", rounds=(1, 2))
    cfg = C.from_dict(dict(raw, continual={**raw["continual"], "order": ["dbpedia", "agnews"]}))
    assert cfg.continual.task_names() == ["dbpedia", "agnews"]
    assert [t.rounds for t in cfg.continual.tasks] == [2, 1]  # each table moves whole
    again = C.from_dict(cfg.to_dict())
    assert again.continual.task_names() == ["dbpedia", "agnews"] and again.digest() == cfg.digest()
    for order in (["dbpedia"], ["dbpedia", "dbpedia"], ["dbpedia", "agnews", "yelp"], ["dbpedia", "Agnews"]):
        with pytest.raises(ConfigError, match=r"continual.order.*must name every task once \(agnews, dbpedia\)"):
            C.from_dict(dict(raw, continual={**raw["continual"], "order": order}))


# ------------------------------------------------------------------------------------ federated, end to end
def test_a_federated_task_sequence_measures_R_and_keeps_past_tasks_frozen(tmp_path, shared_data):
    import json

    from fedlora.config import FedLoraConfig
    from fedlora.simulate import simulate
    from fedlora.state import ClientStateStore

    raw, _ = _continual(tmp_path, "olora")
    raw["data"]["max_train_examples"] = 150
    raw["data"]["max_test_examples"] = 60
    raw["federation"].update(num_clients=2, min_train_clients=2, min_evaluate_clients=2)
    cfg = FedLoraConfig.from_dict(raw)
    run = simulate(cfg, engine="inprocess").path  # the method's maths and state, not the engine's
    summary = json.loads((run / "summary.json").read_text())["continual"]
    assert summary["tasks"] == ["agnews", "dbpedia"] and summary["method"] == "olora"
    R = summary["R"]
    assert R[0][1] is None and all(0.0 <= x <= 1.0 for x in (R[0][0], R[1][0], R[1][1]))
    assert summary["bwt"] == pytest.approx(R[1][0] - R[0][0])
    assert (run / "continual.png").exists() and (run / "continual-task-aware.png").exists()
    # the task id known at test time: an argmax over the task's own labels is never worse than over all
    aware = summary["task-aware"]["R"]
    assert all(aware[i][j] >= R[i][j] for i in range(2) for j in range(i + 1))
    # the saved adapter is one PEFT LoRA holding both task LoRAs (ranks 4 + 4), as the forward pass adds them
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 8
    # every client holds task 0 as the server froze it, bit for bit
    from fedlora.state import tensors_from_file

    ck, _ = tensors_from_file(run / "checkpoint" / "global.safetensors")
    frozen = {k[len("past0/") :]: v for k, v in ck.items() if k.startswith("past0/")}
    assert frozen
    store = ClientStateStore(run / "client_state")
    for cid in ("client-00000", "client-00001"):
        held = store.load(cid, f"continual-{cfg.digest()}-task0")
        assert held is not None
        for key, t in held.tensors():
            assert torch.equal(t, frozen[key]), key


def test_a_client_restarted_between_tasks_recovers_the_finished_tasks_from_its_store(tmp_path, shared_data):
    from flwr.app import ArrayRecord

    from fedlora import codec
    from fedlora.clients.session import ClientSession
    from fedlora.config import FedLoraConfig
    from fedlora.continual import client as cclient
    from fedlora.continual.federation import PAST_PREFIX

    raw, _ = _continual(tmp_path, "inclora")
    raw["data"]["max_train_examples"] = 100
    cfg = FedLoraConfig.from_dict(raw)
    state = {"partition-id": 0, "state-dir": str(tmp_path / "state")}
    first = ClientSession.from_parts(cfg, state, node_id=1)
    model = first.model()
    from fedlora.factors import LoraFactors, lora_layers

    first.modules = [n for n, _ in lora_layers(model)]
    task0 = _random_past(model, 1, seed=3)[0]
    for m in task0.modules.values():
        m.alpha = float(m.rank)
    msg = codec.encode(task0, prefix=PAST_PREFIX.format(0), modules=first.modules)

    def client(session, arrays):  # round 2 trains task 1: task 0 is finished
        return session.client_round(model, arrays, LoraFactors(), server_round=2, config={})

    got = cclient.past_tasks(client(first, msg))  # task 0 arrives with the message
    assert cclient.held(client(first, msg)) == 1
    # a new process: nothing in memory, an empty message; the store has task 0
    second = ClientSession.from_parts(FedLoraConfig.from_dict(raw), state, node_id=1)
    second.modules = first.modules
    again = cclient.past_tasks(client(second, ArrayRecord()))
    for (k, a), (_, b) in zip(got[0].tensors(), again[0].tensors()):
        assert torch.equal(a, b), k
    from fedlora.continual.extension import Continual

    assert Continual(second.cfg).reply_metrics(client(second, ArrayRecord())) == {"past-tasks": 1}
    # a client that never received task 0 says so instead of training without it
    third = ClientSession.from_parts(FedLoraConfig.from_dict(raw), {**state, "state-dir": str(tmp_path / "other")}, 1)
    third.modules = first.modules
    with pytest.raises(cclient.MissingPastTask, match="finished task 0"):
        cclient.past_tasks(client(third, ArrayRecord()))


@pytest.mark.parametrize("scale", [0.0, 16.0])
def test_label_name_head_logits_are_scaled_cosines(scale):
    """The frozen head's rows are unit label-name features; with a scale, its input is a unit vector
    times the scale, so every logit is scale * cosine (and the scale never changes the argmax)."""
    from transformers import BertConfig, BertForSequenceClassification

    from fedlora.continual.head import install_label_name_head
    from fedlora.model import load_tokenizer

    torch.manual_seed(0)
    base = BertForSequenceClassification(
        BertConfig(
            vocab_size=30522,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=3,
        )
    )
    tok = load_tokenizer("builtin:tiny-bert")
    rows = install_label_name_head(base, tok, ["World", "Sports", "Business"], scale)
    assert torch.allclose(rows.norm(dim=-1), torch.ones(3), atol=1e-5)
    feats = []
    base.classifier.register_forward_pre_hook(lambda m, a: feats.append(a[0].detach()), prepend=True)
    base.eval()
    enc = tok(["a match report", "a market report"], padding=True, return_tensors="pt")
    logits = base(**enc).logits
    f = feats[0]
    cos = torch.nn.functional.normalize(f, dim=-1) @ rows.T
    want = scale * cos if scale else f @ rows.T
    assert torch.allclose(logits, want, atol=1e-5)
    assert torch.equal(logits.argmax(-1), cos.argmax(-1))
    assert not base.classifier.weight.requires_grad
