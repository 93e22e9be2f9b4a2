"""The run config: defaults, overrides, and clear errors naming the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_config
from fedlora.config import ConfigError, FedLoraConfig


def test_embedded_default_is_valid_and_matches_the_issue():
    cfg = FedLoraConfig.load()
    assert cfg.model.name == "builtin:all-MiniLM-L6-v2"
    assert cfg.data.dataset == "builtin:fortunes"
    assert cfg.federation.num_clients == 10
    assert cfg.data.partitioner == "dirichlet" and cfg.data.dirichlet_alpha == 0.5


def test_overrides_are_typed():
    cfg = FedLoraConfig.load(
        None,
        ["lora.rank=4", 'lora.target_modules=["query"]', "federation.strategy=fedsa", "hetero.device_classes.edge=2"],
    )
    assert cfg.lora.rank == 4 and cfg.lora.target_modules == ["query"]
    assert cfg.federation.strategy == "fedsa"
    assert cfg.hetero.device_classes == {"edge": 2}


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("lora.rnak=4", "unknown config key 'lora.rnak'"),
        ("loar.rank=4", "unknown config section [loar]"),
        ("lora.rank=0", "'lora.rank': must be >= 1, got 0"),
        ("lora.rank=-3", "'lora.rank'"),
        ("federation.strategy=fedavgx", "unknown strategy 'fedavgx'"),
        ("federation.wire_dtype=int8", "'federation.wire_dtype'"),
        ('lora.rank="eight"', "expected an integer"),
        ("data.partitioner=random", "'data.partitioner'"),
        ("federation.min_train_clients=20", "must not exceed federation.num_clients"),
        ('hetero.client_classes=["phone"]', "device class 'phone' is not defined"),
        ("federation.server_eval_every=0", "'federation.server_eval_every': must be >= 1"),
        ('lora.target_modules=["query"', 'lora.target_modules=["query": the value is not valid TOML'),
        ('data.instruction="unterminated', "the value is not valid TOML"),
        ("hetero.sketch_oversampling=-1", "'hetero.sketch_oversampling': must be >= 0"),
        ("robust.held_updates_budget_mb=0", "'robust.held_updates_budget_mb': must be > 0"),
    ],
)
def test_bad_values_name_the_field(override, fragment):
    with pytest.raises(ConfigError, match=None) as exc:
        FedLoraConfig.load(None, [override])
    assert fragment in str(exc.value)


def test_config_json_round_trip_and_digest():
    cfg = FedLoraConfig.load(None, ["lora.rank=16"])
    again = FedLoraConfig.from_json(cfg.to_json())
    assert again == cfg and again.digest() == cfg.digest()
    assert FedLoraConfig.load(None, ["lora.rank=4"]).digest() != cfg.digest()


def test_toml_snapshot_reloads(tmp_path):
    cfg = FedLoraConfig.load(None, ["run.rounds=5"])
    p = tmp_path / "c.toml"
    p.write_text(cfg.to_toml())
    assert FedLoraConfig.load(p) == cfg


def test_target_module_absent_from_model(tmp_path, shared_data):
    from fedlora.model import AdapterSpec, build_peft_model

    cfg = make_config(tmp_path)
    with pytest.raises(ConfigError, match="module 'q_proj' is not in the model; its linear layers are named"):
        build_peft_model(cfg, 4, AdapterSpec(rank=4, alpha=8, dropout=0.0, target_modules=("q_proj",)))


def test_missing_label_column(tmp_path, shared_data):
    from fedlora.data import load_task

    cfg = make_config(tmp_path, data={"label_column": "category"})
    with pytest.raises(
        ConfigError, match="'data.label_column': column 'category' is not in the dataset; its columns are"
    ):
        load_task(cfg)


def test_more_clients_than_examples(tmp_path, shared_data):
    from fedlora.data import load_task
    from fedlora.partitions import partition_indices

    cfg = make_config(tmp_path, data={"max_train_examples": 20}, federation={"num_clients": 50})
    with pytest.raises(ConfigError, match="50 clients but only 20 training examples"):
        partition_indices(cfg, load_task(cfg).train_labels)


def test_per_client_ranks_from_device_classes():
    cfg = FedLoraConfig.load(
        None,
        [
            "federation.strategy=hetlora",
            "hetero.device_classes={edge=2, laptop=8}",
            'hetero.client_classes=["edge", "edge", "laptop"]',
        ],
    )
    assert [cfg.client_rank(i) for i in range(4)] == [2, 2, 8, 2]
    cfg = FedLoraConfig.load(
        None,
        [
            "federation.strategy=flexlora",
            "hetero.device_classes={edge=2, server=16}",
            "hetero.class_distribution={edge=0.7, server=0.3}",
        ],
    )
    assert [cfg.client_rank(i) for i in range(10)] == [2] * 7 + [16] * 3


def test_mixed_ranks_with_a_single_rank_strategy_fail_on_load_with_the_reason():
    with pytest.raises(ConfigError, match="fedit cannot mix ranks \\[2, 8\\].*use hetlora, flora or flexlora"):
        FedLoraConfig.load(None, ["hetero.client_ranks=[2, 8]"])


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("robust.aggregation=mode", "robust.aggregation"),
        ("robust.trim_fraction=0.5", "robust.trim_fraction"),
        ("robust.max_client_share=0", "robust.max_client_share"),
        ("robust.update_norm_bound=-1", "robust.update_norm_bound"),
        ("robust.norm_action=ignore", "robust.norm_action"),
        ("robust.relative_norm_reject=1.5", "robust.relative_norm_reject"),  # at the bound: not above it
        ("federation.min_accepted=0", "federation.min_accepted"),
        ("federation.round_timeout=0", "federation.round_timeout"),
        ("data.validation_fraction=0.8", "data.validation_fraction"),
    ],
)
def test_robustness_settings_are_validated(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", "\\.")):
        FedLoraConfig.load(None, [override])


def test_robust_aggregation_is_refused_for_heterogeneous_ranks():
    with pytest.raises(ConfigError, match="robust.aggregation.*different ranks"):
        FedLoraConfig.load(None, ["federation.strategy=hetlora", "robust.aggregation=median"])


def test_a_split_may_pool_several_files(tmp_path, shared_data):
    from fedlora.data import load_task

    ag = shared_data / "agnews"
    cfg = make_config(
        tmp_path,
        data={
            "data_files": {"train": [str(ag / "train.jsonl"), str(ag / "test.jsonl")]},
            "test_split": "",
            "max_train_examples": 0,
            "max_test_examples": 0,
        },
    )
    assert cfg.data.data_files == {"train": [str(ag / "train.jsonl"), str(ag / "test.jsonl")]}
    task = load_task(cfg)
    assert len(task.train.labels) + len(task.test.labels) == 4000 + 7600  # both files, carved into two splits
    single = make_config(tmp_path, data={"data_files": {"train": str(ag / "train.jsonl")}, "test_split": ""})
    assert single.data.data_files == {"train": [str(ag / "train.jsonl")]}  # one file is a list of one
    extra = tmp_path / "extra.csv"
    extra.write_text("text,label\nhello,World\n")
    with pytest.raises(ConfigError, match="files of one type only"):
        load_task(
            make_config(
                tmp_path, data={"data_files": {"train": [str(ag / "train.jsonl"), str(extra)]}, "test_split": ""}
            )
        )


def test_the_committed_configuration_page_is_what_the_code_generates():
    """docs/configuration.md is `fedlora config --reference --format markdown` of the embedded default:
    a key added, renamed or re-documented in the code without regenerating the page fails here."""

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-m", "fedlora.cli", "config", "--reference", "--format", "markdown"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=root,
    )
    assert out.returncode == 0, out.stderr
    committed = (root / "docs" / "configuration.md").read_text()
    assert out.stdout == committed, (
        "docs/configuration.md is stale: regenerate it with "
        "`fedlora config --reference --format markdown > docs/configuration.md`"
    )
    # every key of every section is on the page
    from dataclasses import fields

    from fedlora.config import _SECTIONS, FedLoraConfig

    cfg = FedLoraConfig.load()
    for section in _SECTIONS:
        assert f"## [{section}]" in committed
        for f in fields(getattr(cfg, section)):
            assert f"| `{f.name}` |" in committed, (section, f.name)


def test_fedlora_config_loads_neither_torch_nor_flower():
    """The command as a user runs it: validating and printing a config imports no training stack."""

    code = (
        "import sys\nfrom fedlora.cli import main\nsys.argv = ['fedlora', 'config', '--reference']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('LOADED', sorted(m for m in ('torch', 'flwr', 'transformers', 'opacus', 'ray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "[continual]" in out.stdout  # the reference printed
    assert out.stdout.strip().splitlines()[-1] == "LOADED []", out.stdout[-500:] + out.stderr[-2000:]


def test_run_name_follows_dataset_and_strategy():
    assert FedLoraConfig.load().run_name() == "fortunes-fedit"
    assert FedLoraConfig.load(None, ["federation.strategy=fedsa"]).run_name() == "fortunes-fedsa"
    cfg = FedLoraConfig.load(None, ['data.dataset="../shared/data/agnews/"', "federation.strategy=ffa"])
    assert cfg.run_name() == "agnews-ffa"
    assert FedLoraConfig.load(None, ['run.name="mine"']).run_name() == "mine"
