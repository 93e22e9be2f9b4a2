"""fedlora's ServerApp: builds the strategy from the run config and drives Flower's round loop.

:func:`run_server` is the whole server: it is what ``fedlora simulate`` runs inside Flower's
simulation engine and what the module-level ``app`` runs on a real deployment (the run config
travels as the ``config`` key of Flower's run config: a TOML path or inline JSON).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedlora import codec
from fedlora.aggregation.streaming import StreamingGrid, replies_per_pull
from fedlora.config import FedLoraConfig
from fedlora.data import load_task
from fedlora.dylora import RankMask
from fedlora.factors import LoraFactors, load_factors
from fedlora.lora_math import concat_rank, to_client, to_effective
from fedlora.model import (
    AdapterSpec,
    build_peft_model,
    check_device,
    initial_factors,
    merge_delta_into_base,
    place,
    skeleton_peft_model,
    write_adapter,
)
from fedlora.partitions import server_validation
from fedlora.privacy.accounting import check_client_targets
from fedlora.registry import get_strategy
from fedlora.rundir import RunDir, atomic_write
from fedlora.state import atomic_write_bytes, tensors_to_bytes
from fedlora.training import evaluate, pick_device, predict

log = logging.getLogger("fedlora.server")


class GlobalModel:
    """The server's view of the model: the adapter's structure (module names, factor shapes, LoRA
    config) to start, check and save the global adapter, and, when the server evaluates
    (``federation.server_eval``), a copy of the model to evaluate it with.

    Without server evaluation the server holds no base weights at all: the structure is built on
    PyTorch's meta device, so aggregating a 7B model's factors costs the factors' memory only."""

    def __init__(self, cfg: FedLoraConfig, label_names: list[str], rank: int) -> None:
        self.label_names = list(label_names)
        self.num_labels = len(label_names)
        self.cfg = cfg
        self.rank = rank
        self.alpha = cfg.lora.alpha_for_rank(rank)
        self.device = pick_device(cfg.train.device)
        spec = AdapterSpec.for_rank(cfg, rank)
        check_device(cfg, self.device)
        if cfg.federation.server_eval or cfg.continual.enabled:  # a task sequence's head needs real embeddings
            self.structure = place(build_peft_model(cfg, self.num_labels, spec, self.label_names), self.device)
        else:
            self.structure = skeleton_peft_model(cfg, self.num_labels, spec, self.label_names)
        self.init = initial_factors(self.structure, cfg.lora.init_seed)

    def template(self) -> LoraFactors:
        return self.init

    def load(self, strategy) -> torch.nn.Module:  # noqa: ANN001
        """Load the strategy's global adapter; frozen parts come from the shared seed."""
        g = strategy.global_eff
        model = place(build_peft_model(self.cfg, self.num_labels, AdapterSpec.for_rank(self.cfg, self.rank),
                                       self.label_names), self.device)
        if strategy.sharing_policy.merge_global_into_base:
            load_factors(model, self._flora_start(g))
            if g.modules:
                merge_delta_into_base(model, g)
        else:
            load_factors(model, self.start(strategy).merged_with(to_client(g, self.rank, self.alpha)))
        return model

    def _flora_start(self, g: LoraFactors) -> LoraFactors:
        """FLoRA's adapter on top of the merged base: the seed's A, a zero B, the global head."""
        zero = LoraFactors(modules={n: type(m)(A=m.A, B=torch.zeros_like(m.B), alpha=m.alpha)
                                    for n, m in self.init.modules.items()}, extras=self.init.extras)
        return zero.merged_with(LoraFactors(extras=g.extras))

    def start(self, strategy) -> LoraFactors:  # noqa: ANN001
        """What the clients start from: the seed-built adapter (in a task sequence, the current
        task's seed: frozen parts such as FFA's A differ per task) and the initial head."""
        if getattr(strategy, "past_tasks", None):
            # lazy: the continual-learning concern, loaded only by a continual run
            from fedlora.continual.federation import fresh_adapter, task_seed

            fresh = fresh_adapter(self.init, task_seed(self.cfg, len(strategy.past_tasks)))
            return LoraFactors(modules=fresh.modules, extras=dict(self.init.extras))
        return self.init

    def save(self, strategy, path: Path) -> Path:  # noqa: ANN001
        """Write the global adapter in PEFT's format, from its factors (no model needed)."""
        g = strategy.global_eff
        if strategy.sharing_policy.merge_global_into_base:
            # FLoRA: the merged model is base + the cumulative delta; save that delta as an adapter of
            # its rank, whose scaling is 1 (alpha = r): its B carries the scaling already.
            factors = (LoraFactors(modules={n: type(m)(A=m.A, B=m.B, alpha=float(m.rank)) for n, m in g.modules.items()},
                                   extras=dict(g.extras)) if g.modules else self._flora_start(g))
        elif getattr(strategy, "past_tasks", None) and self.cfg.continual.method in ("inclora", "olora"):
            # The task LoRAs add up: one PEFT LoRA of the summed rank holds exactly their sum.
            current = self.start(strategy).merged_with(to_client(g, self.rank, self.alpha))
            total = to_effective(LoraFactors(modules=current.modules))
            for past in reversed(strategy.past_tasks):
                total = concat_rank(LoraFactors(modules=dict(past.modules)), total)
            factors = LoraFactors(modules={n: type(m)(A=m.A, B=m.B, alpha=float(m.rank)) for n, m in total.modules.items()},
                                  extras=dict(g.extras))
        else:
            factors = self.start(strategy).merged_with(to_client(g, self.rank, self.alpha))
            if getattr(strategy, "past_tasks", None):
                # AM-LoRA: the current task's LoRA is the PEFT adapter; the finished tasks' factors and the
                # selector (which a PEFT adapter cannot express) sit beside it.
                past = {f"task{t}/{k}": v for t, p in enumerate(strategy.past_tasks) for k, v in p.tensors()}
                sel = {k: v for k, v in g.extras.items()}
                path.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(path / "continual_tasks.safetensors", tensors_to_bytes({**past, **sel}))
        return write_adapter(path, self.structure, factors, self.cfg.model.name, self.label_names)


def server_evaluates(cfg: FedLoraConfig, server_round: int) -> bool:
    """Whether the server evaluates the global adapter after ``server_round`` (``federation.server_eval_every``):
    round 0 (the starting point), every N-th round, the last round and, in a task sequence, the end of
    every task (the accuracy matrix's rows) always."""
    if server_round == 0 or server_round >= cfg.run.rounds or server_round % cfg.federation.server_eval_every == 0:
        return True
    if cfg.continual.enabled:
        # lazy: the continual-learning concern, loaded only by a continual run
        from fedlora.continual.tasks import last_round_of_task

        return last_round_of_task(cfg, server_round)
    return False


def reference_rank(cfg: FedLoraConfig) -> int:
    """The rank the global adapter is kept at: the largest any client trains."""
    return max(cfg.client_rank(i) for i in range(cfg.federation.num_clients))


def run_server(grid: Grid, cfg: FedLoraConfig, run_dir: RunDir | None = None,
               on_round: Callable[[dict], None] | None = None, resume: bool = False,
               node_names: Callable[[int], str | None] | None = None):  # noqa: ANN201 - flwr Result
    """Run a whole federation on ``grid``; write metrics/adapters to ``run_dir`` if given.

    ``resume``: continue ``run_dir``'s run from its last checkpoint (the round after the last one
    completed, with the same round numbers, sampling and seeds as an uninterrupted run)."""
    t_start = time.perf_counter()

    check_client_targets(cfg)  # privacy calibration when the run starts (also under `flwr run`)
    continual = cfg.continual.enabled
    if continual:  # a task sequence: one label space over the tasks, each task's own held-out set
        # lazy: the continual-learning concern, loaded only by a continual run
        from fedlora.continual import metrics as cmetrics
        # lazy: the continual-learning concern, loaded only by a continual run
        from fedlora.continual import tasks as ctasks

        task, val, label_names = None, None, ctasks.union_labels(cfg)
    else:
        task = load_task(cfg)
        val = server_validation(cfg)
        label_names = task.label_names
    gm = GlobalModel(cfg, label_names, reference_rank(cfg))
    strategy_cls = get_strategy(cfg.federation.strategy)
    strategy = strategy_cls(cfg, gm.template())
    strategy.global_eff = strategy.initial_global(to_effective(gm.init))
    strategy.label_names = list(label_names)
    strategy.node_names = node_names
    if resume:
        done = resume_strategy(strategy, cfg, run_dir)
        log.info("resuming %s after round %d of %d", run_dir.path if run_dir else "", done, cfg.run.rounds)
    raw_template = {dt: codec.raw_bytes(gm.init.select(strategy.sharing_policy.shared), dt) for dt in codec.WIRE_DTYPES}
    if run_dir is not None and not resume:
        run_dir.write_config(cfg)
    if run_dir is not None and cfg.run.tensorboard:
        run_dir.enable_tensorboard()
    timer = {"t": time.perf_counter()}

    def evaluate_global(model: torch.nn.Module, server_round: int) -> dict:
        row: dict = {}
        bs = cfg.train.eval_batch_size
        test = task.test if not continual else ctasks.task_test(cfg, ctasks.task_of_round(cfg, server_round))
        res = evaluate(model, test, bs, gm.device)
        row["server-loss"] = res["loss"]
        if "accuracy" in res:  # a causal LM on free-form instructions has loss and perplexity only
            row["server-accuracy"] = res["accuracy"]
        if "perplexity" in res:
            row["server-perplexity"] = res["perplexity"]
            row["server-unparsed"] = res.get("unparsed")
        if val is not None:
            vres = evaluate(model, val, bs, gm.device)
            row["server-val-accuracy"] = vres.get("accuracy")
            row["server-val-loss"] = vres["loss"]
        if cfg.dylora.eval_ranks:  # the global adapter truncated to rank r (scaling alpha/r)
            mask = RankMask(model)
            try:
                for r in cfg.dylora.eval_ranks:
                    mask.set(min(r, mask.max_rank))
                    at_rank = evaluate(model, test, bs, gm.device)
                    row[f"server-accuracy-rank-{r}"] = at_rank.get("accuracy")
                    row[f"server-loss-rank-{r}"] = at_rank["loss"]
            finally:
                mask.remove()
        if continual and server_round > 0 and ctasks.last_round_of_task(cfg, server_round):
            # The accuracy matrix's row for the task that ends now: every task seen so far.
            k = ctasks.task_of_round(cfg, server_round)
            names = cfg.continual.task_names()
            seen = range(len(names)) if cfg.continual.method == "multitask" else range(k + 1)
            row["continual-task"] = k
            row["continual-accuracy"], row["continual-accuracy-task-aware"] = {}, {}
            for j in seen:  # one forward pass per task serves both inference settings
                test_j = ctasks.task_test(cfg, j)
                agnostic, aware = cmetrics.accuracies(predict(model, test_j, bs, gm.device), test_j.labels,
                                                      ctasks.task_label_indices(cfg, j))
                row["continual-accuracy"][names[j]] = agnostic
                row["continual-accuracy-task-aware"][names[j]] = aware
            if cfg.data.validation_fraction > 0:  # the same on the clients' validation parts (model selection)
                vals = {names[j]: evaluate(model, ctasks.task_validation(cfg, j), bs, gm.device)["accuracy"]
                        for j in seen}
                row["continual-val-accuracy"] = vals
                row["continual-val-average"] = sum(vals.values()) / len(vals)
        return row

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if resume and server_round == 0:
            return None  # the resumed run's starting point is the checkpoint's last round, already logged
        server_round += strategy.round_offset
        row: dict = {"round": server_round, "strategy": strategy.strategy_name}
        if cfg.federation.server_eval and strategy.has_global_model and server_evaluates(cfg, server_round):
            model = gm.load(strategy)  # once per round: every evaluation below reads the same adapter
            # lazy: the continual-learning concern, loaded only by a continual run
            from fedlora.continual.federation import task_lora

            with task_lora(cfg, model, strategy.past_tasks):  # a task sequence: finished tasks' LoRAs too
                row.update(evaluate_global(model, server_round))
        rl = strategy.rounds.get(server_round)
        if rl is not None:
            row.update({
                "clients-sampled": rl.sampled, "clients-accepted": rl.accepted, "rejected": rl.rejected,
                "rejected-evaluate": rl.rejected_evaluate, "flagged": rl.flagged, "clipped": rl.clipped,
                "skipped": rl.skipped or None, "aggregation-error": rl.aggregation_error or None,
                "bytes-up-total": sum(rl.bytes_up), "bytes-down-total": sum(rl.bytes_down),
                "bytes-up-per-client": _mean(rl.bytes_up), "bytes-down-per-client": _mean(rl.bytes_down),
                "payload-up-per-client": _mean(rl.payload_up), "payload-down-per-client": _mean(rl.payload_down),
                "aggregate-seconds": rl.aggregate_seconds, "server-seconds": rl.server_seconds,
                "train-loss": rl.train_metrics.get("train-loss"),
                "client-train-seconds": rl.train_metrics.get("train-seconds"),
                **{k: v for k, v in rl.eval_metrics.items()},
                "clients": [{k: c[k] for k in ("client-id", "accuracy", "num-examples", "global-accuracy") if k in c}
                            for c in rl.eval_clients],
            })
        row["global-rank"] = strategy.global_rank()
        if rl is not None:
            if rl.dylora_rank is not None:
                row["dylora-rank"] = rl.dylora_rank
            row.update(rl.privacy)
        row["raw-factor-bytes-per-client"] = raw_template[cfg.federation.wire_dtype]
        now = time.perf_counter()
        row["seconds"] = now - timer["t"]
        timer["t"] = now
        if run_dir is not None:
            run_dir.append_metrics(row)
            run_dir.write_checkpoint(*strategy.state_dict())
        if on_round is not None:
            on_round(row)
        if "server-loss" in row:
            return MetricRecord({k: row[f"server-{k}"] for k in ("accuracy", "loss", "perplexity")
                                 if row.get(f"server-{k}") is not None and math.isfinite(row[f"server-{k}"])})
        return None

    result = strategy.start(
        grid=StreamingGrid(grid, max_pull=replies_per_pull(cfg, strategy.template)),
        initial_arrays=codec.encode(strategy.global_eff), num_rounds=cfg.run.rounds - strategy.round_offset,
        timeout=cfg.federation.round_timeout, train_config=ConfigRecord(), evaluate_config=ConfigRecord(),
        evaluate_fn=evaluate_fn,
    )
    if run_dir is not None:
        gm.save(strategy, run_dir.path / "adapter")
        rows = run_dir.read_metrics()
        last = rows[-1] if rows else {}
        baselines = (accuracy_baselines(task.test.labels, task.num_labels) if task is not None and task.num_labels
                     else {"chance": 1.0 / len(label_names)} if label_names else {})
        run_dir.write_summary({
            "strategy": strategy.strategy_name, "rounds": cfg.run.rounds, "seconds": time.perf_counter() - t_start,
            "baselines": baselines, "label-names": label_names,
            "privacy": privacy_summary(cfg, strategy, rows),
            "final": {k: v for k, v in last.items() if k != "clients"},
            "bytes-up-total": sum(r.get("bytes-up-total", 0) for r in rows),
            "bytes-down-total": sum(r.get("bytes-down-total", 0) for r in rows),
        })
        run_dir.plot(baselines)
        if continual:  # cmetrics was imported with the task sequence's other modules at the start
            multitask = cfg.continual.method == "multitask"
            cont = cmetrics.from_rows(rows, cfg.continual.task_names(), multitask)
            aware = cmetrics.from_rows(rows, cfg.continual.task_names(), multitask, key="continual-accuracy-task-aware")
            summary = json.loads((run_dir.path / "summary.json").read_text())
            summary["continual"] = {"method": cfg.continual.method, **cont, "task-aware": aware}
            run_dir.write_summary(summary)
            for c, name, what in ((cont, "continual.png", "task-agnostic"), (aware, "continual-task-aware.png",
                                                                             "task id known")):
                if c.get("average-accuracy") is not None and not multitask:
                    cmetrics.plot_matrix(c["R"], c["tasks"], run_dir.path / name, f"{cfg.continual.method} "
                                         f"({what}): avg {c['average-accuracy']:.3f}, BWT {c['bwt']:+.3f}")
    return result


def resume_strategy(strategy, cfg: FedLoraConfig, run_dir: RunDir | None) -> int:  # noqa: ANN001
    """Load ``run_dir``'s checkpoint into ``strategy``; return the rounds it had completed."""
    if run_dir is None:
        raise ValueError("resume needs the run directory of the interrupted run")
    found = run_dir.read_checkpoint()
    if found is None:
        raise ValueError(f"{run_dir.path} holds no checkpoint (checkpoint/state.json): the run never finished a round")
    tensors, state = found
    if state.get("config-digest") != cfg.digest():
        raise ValueError(f"{run_dir.path}: its checkpoint was written by a run with a different config; resume "
                         "runs the config.toml saved in the run directory, unchanged")
    strategy.load_state_dict(tensors, state)
    done = int(state["last-round"])
    if done >= cfg.run.rounds:
        raise ValueError(f"{run_dir.path} finished all {cfg.run.rounds} rounds; nothing to resume")
    strategy.round_offset = done
    # Metrics rows past the checkpoint (a crash between the metrics line and the checkpoint) are dropped,
    # so the file holds each round once.
    rows = [r for r in run_dir.read_metrics() if r["round"] <= done]

    atomic_write(run_dir.metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return done


def privacy_summary(cfg: FedLoraConfig, strategy, rows: list[dict]) -> dict:  # noqa: ANN001
    """The (epsilon, delta) the run spent, at client level and (largest over clients) example level."""
    out: dict = {}
    if strategy.dp is not None:
        out["client-level"] = {"epsilon": strategy.dp.epsilon() if strategy.dp.noise_multiplier > 0 else None,
                               "delta": strategy.dp.delta, "noise-multiplier": strategy.dp.noise_multiplier,
                               "released-rounds": strategy.dp.released, "accountant": "flwr RdpAccountant "
                               "(sampling without replacement, replace-one)"}
    eps = [r["dp-sgd-epsilon-max"] for r in rows if r.get("dp-sgd-epsilon-max") is not None]
    if cfg.privacy.example_dp:
        out["example-level"] = {"epsilon-max-over-clients": max(eps) if eps else None,
                                "delta": cfg.privacy.example_delta, "accountant": "opacus RDPAccountant"}
    return out


def accuracy_baselines(labels: torch.Tensor, num_labels: int) -> dict[str, float]:
    """What accuracy means on this held-out set: chance (uniform guess) and the majority class."""
    counts = torch.bincount(labels, minlength=num_labels)
    return {"chance": 1.0 / num_labels, "majority class": float(counts.max()) / max(int(counts.sum()), 1)}


def _mean(xs: list[int]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


# ---------------------------------------------------------------------------------------------
# Deployment entry point (`flwr run`): the run config's `config` key names a TOML file or holds JSON.
# ---------------------------------------------------------------------------------------------
app = ServerApp()


def resolve_app_path(path: str) -> Path:
    """A run config path given to `flwr run`: absolute, or relative to the working folder of the
    process running the ServerApp, or relative to the Flower App as installed (FAB) under
    ``$FLWR_HOME/apps`` (a SuperLink runs the app from there, not from the user's folder)."""
    import os

    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    home = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
    apps = sorted((home / "apps").glob("fedlora.*"), key=lambda d: d.stat().st_mtime, reverse=True)
    for app_dir in apps:
        if (app_dir / p).exists():
            return app_dir / p
    raise FileNotFoundError(f"run config {path!r} is relative and found neither in {Path.cwd()} (where Flower "
                            f"runs the ServerApp) nor in the installed app under {home / 'apps'}; pass an absolute "
                            f"path: --run-config \"config='$PWD/{path}'\", or use `fedlora server`")


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run config keys: ``config`` (a TOML path or inline JSON; '' = the embedded default),
    ``run-dir`` (an absolute folder for this run; '' = a new one under run.output_dir) and
    ``resume`` (continue ``run-dir``'s run from its checkpoint): `fedlora server` sets all three."""
    rc = context.run_config
    src = str(rc.get("config", "") or "")
    if src.strip().startswith("{"):
        cfg = FedLoraConfig.from_json(src)
    else:
        cfg = FedLoraConfig.load(resolve_app_path(src) if src else None)
    folder = str(rc.get("run-dir", "") or "")
    names = None
    if bool(rc.get("bind-node-names", False)) and folder:
        # lazy: deployment only. The nodes that take part are those holding a key of
        # server.enrolled_keys, read now, whatever else the SuperLink has registered.
        from fedlora.deploy.control import EnrolledGrid, EnrolledNodes
        from fedlora.deploy.server import enrolled_keys

        names = EnrolledNodes(Path(folder) / "flwr-home", enrolled_keys(cfg))
        grid = EnrolledGrid(grid, names)
    run_server(grid, cfg, RunDir(folder) if folder else RunDir.create(cfg), resume=bool(rc.get("resume", False)),
               node_names=names)
