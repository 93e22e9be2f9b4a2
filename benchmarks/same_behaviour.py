"""Behaviour unchanged across a refactor: twelve small deterministic federations (FedIT, FedSA-LoRA,
client-level DP, DP-DyLoRA, DP-SGD, IncLoRA, AM-LoRA, O-LoRA, FLoRA, HetLoRA with self-pruning, the
coordinate median, an absolute norm bound that clips; tiny BERT, in process), each run's
metrics rows (every key but wall times), adapter tensors (SHA-256) and privacy/continual summary.

Run it once per source tree and compare the two files (``--compare``)::

    git worktree add /tmp/before <commit>
    PYTHONPATH=/tmp/before:/tmp/before/tests python benchmarks/same_behaviour.py before.json
    PYTHONPATH=.:tests python benchmarks/same_behaviour.py after.json
    python benchmarks/same_behaviour.py --compare before.json after.json
"""

import hashlib
import json
import sys
import tempfile
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VOLATILE = ("seconds",)  # wall times: the only keys allowed to differ


def continual(tmp, method, **extra):
    from conftest import make_config  # the tree under test's (PYTHONPATH)
    from fedlora.config import FedLoraConfig

    raw = make_config(tmp).to_dict()
    raw["run"]["rounds"] = 2
    raw["continual"] = {
        "method": method,
        "tasks": [
            {"name": "agnews", "dataset": str(SHARED / "agnews"), "rounds": 1},
            {"name": "dbpedia", "dataset": str(SHARED / "dbpedia"), "rounds": 1},
        ],
    }
    raw.update(extra)
    return FedLoraConfig.from_dict(raw)


def cases(tmp):
    from conftest import make_config  # the tree under test's (PYTHONPATH)

    yield "fedit", make_config(tmp / "a")
    yield "fedsa", make_config(tmp / "b", federation={"strategy": "fedsa"})
    yield (
        "client-dp",
        make_config(
            tmp / "c", privacy={"client_dp": True, "client_noise_multiplier": 0.5, "client_clip": 0.5, "noise_seed": 3}
        ),
    )
    yield (
        "dp-dylora",
        make_config(
            tmp / "d",
            privacy={"client_dp": True, "client_noise_multiplier": 0.5, "client_clip": 0.5, "noise_seed": 3},
            dylora={"enabled": True, "min_rank": 1, "eval_ranks": [1, 2]},
        ),
    )
    yield (
        "dp-sgd",
        make_config(tmp / "e", privacy={"example_dp": True, "example_noise_multiplier": 1.0, "noise_seed": 5}),
    )
    yield "inclora", continual(tmp / "f", "inclora")
    yield "amlora", continual(tmp / "g", "amlora")
    yield "olora", continual(tmp / "h", "olora")
    ranks = {"client_ranks": [2, 4, 8]}
    yield "flora", make_config(tmp / "i", federation={"strategy": "flora"}, lora={"rank": 8}, hetero=ranks)
    yield (
        "hetlora-prune",
        make_config(
            tmp / "j",
            federation={"strategy": "hetlora"},
            lora={"rank": 8},
            hetero={**ranks, "hetlora_prune": True, "hetlora_prune_ratio": 0.5},
        ),
    )
    yield "median", make_config(tmp / "k", robust={"aggregation": "median"})
    yield "norm-bound", make_config(tmp / "l", robust={"update_norm_bound": 0.01})


def clean(row):
    return {k: v for k, v in row.items() if not any(x in k for x in VOLATILE)}


def compare(before: Path, after: Path) -> dict:
    a, b = json.loads(before.read_text()), json.loads(after.read_text())
    verdict = {}
    for name in a:
        rows = {
            i: sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
            for i, (x, y) in enumerate(zip(a[name]["rows"], b[name]["rows"]))
            if x != y
        }
        ca, cb = a[name]["continual"] or {}, b[name]["continual"] or {}
        verdict[name] = {
            "rows-differ": rows,
            "adapter-equal": a[name]["adapter"] == b[name]["adapter"],
            "privacy-equal": a[name]["privacy"] == b[name]["privacy"],
            "continual-summary-differs": sorted(k for k in set(ca) | set(cb) if ca.get(k) != cb.get(k)),
        }
    return verdict


def main(out_path: Path) -> None:
    from safetensors.torch import load_file

    from fedlora.simulate import simulate

    out = {}
    with tempfile.TemporaryDirectory() as d:
        for name, cfg in cases(Path(d)):
            run = simulate(cfg, engine="inprocess")
            rows = [clean(r) for r in run.read_metrics()]
            adapter = load_file(str(run.path / "adapter" / "adapter_model.safetensors"))
            digest = {
                k: hashlib.sha256(v.float().numpy().tobytes()).hexdigest()[:16] for k, v in sorted(adapter.items())
            }
            side = run.path / "adapter" / "continual_tasks.safetensors"
            if side.exists():
                digest.update(
                    {
                        "side/" + k: hashlib.sha256(v.float().numpy().tobytes()).hexdigest()[:16]
                        for k, v in sorted(load_file(str(side)).items())
                    }
                )
            summary = json.loads((run.path / "summary.json").read_text())
            out[name] = {
                "rows": rows,
                "adapter": digest,
                "privacy": summary.get("privacy"),
                "continual": summary.get("continual"),
            }
            print(name, "done", flush=True)
    out_path.write_text(json.dumps(out, indent=1, sort_keys=True, default=str))


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        print(json.dumps(compare(Path(sys.argv[2]), Path(sys.argv[3])), indent=1))
    else:
        main(Path(sys.argv[1]))
