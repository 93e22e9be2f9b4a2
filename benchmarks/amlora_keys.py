"""Can a task be told from its inputs? The offline check behind AM-LoRA's input-key router (issue 40)::

    python -m benchmarks amlora_keys [--clients 2]

The base MiniLM of ``simulations/compare_continual.toml`` (no LoRA), order 1's four cued tasks. For
every layer the router adapts (the input of layer l's query and value is hidden state l), each
task's key is the moments of the pooled input (:func:`fedlora.continual.routing.pooled_inputs`,
masked) over the training splits of the first ``--clients`` clients. Each example of the clients'
validation parts (:func:`fedlora.continual.tasks.task_validation`, never a test set) is given the
task whose key scores it highest, under two scores:

* ``gaussian``: the router's (:func:`fedlora.continual.routing.key_scores`);
* ``cosine``: the cosine of the pooled input with the mean pooled input of the task.

Writes ``benchmarks/results/amlora-keys.json`` (per layer and score, the share of each task's
validation inputs given their own task) and ``amlora-keys.png``. About 2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from benchmarks.common import RESULTS, continual_arm, setup_env, write

if TYPE_CHECKING:
    import torch


def pooled_per_layer(model, examples) -> torch.Tensor:
    """(examples, layers, features): each example's pooled input of every encoder layer."""
    import torch

    from fedlora.continual.routing import pooled_inputs
    from fedlora.data import batches

    out = []
    for batch, _ in batches(examples, 64, False):
        with torch.no_grad():
            hidden = model(**batch, output_hidden_states=True).hidden_states[:-1]  # the layers' inputs
        out.append(torch.stack([pooled_inputs(h, batch["attention_mask"]) for h in hidden], 1))
    return torch.cat(out).double()


def run(clients: int) -> dict:
    import torch
    from transformers import AutoModel

    from fedlora.continual import tasks as ctasks
    from fedlora.continual.routing import key_scores, moments
    from fedlora.model_sources import resolve_model_path

    cfg = continual_arm("am-lora", [])
    names = cfg.continual.task_names()
    model = AutoModel.from_pretrained(resolve_model_path(cfg.model.name, cfg.model.cache_dir)).eval()
    train = [
        torch.cat([pooled_per_layer(model, ctasks.task_client_data(cfg, c, t).train) for c in range(clients)])
        for t in range(len(names))
    ]
    val = [pooled_per_layer(model, ctasks.task_validation(cfg, t)) for t in range(len(names))]
    layers = train[0].shape[1]
    result: dict = {"tasks": names, "clients": clients, "layers": {}}
    for layer in range(layers):
        sums = [moments(x[:, layer]) for x in train]
        mean = torch.stack([s1 / n for s1, _, n in sums])
        second = torch.stack([s2 / n for _, s2, n in sums])
        centre = torch.nn.functional.normalize(mean, dim=-1)
        row = {}
        for score in ("gaussian", "cosine"):
            own = []
            for t, x in enumerate(val):
                v = x[:, layer]
                s = (
                    key_scores(v, mean, second, 1.0)
                    if score == "gaussian"
                    else torch.nn.functional.normalize(v, dim=-1) @ centre.T
                )
                own.append(float((s.argmax(-1) == t).double().mean()))
            row[score] = dict(zip(names, own))
        result["layers"][layer] = row
    return result


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, score in zip(axes, ("gaussian", "cosine")):
        for t in result["tasks"]:
            ax.plot(
                [int(k) for k in result["layers"]],
                [r[score][t] for r in result["layers"].values()],
                marker="o",
                label=t,
            )
        ax.set_title(f"{score} score")
        ax.set_xlabel("layer")
    axes[0].set_ylabel("validation inputs given their own task")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=2, help="clients whose training splits make the keys")
    args = ap.parse_args()
    setup_env()
    res = run(args.clients)
    write("amlora-keys", res)
    plot(res, RESULTS / "amlora-keys.png")
    print(json.dumps(res["layers"], indent=1))
