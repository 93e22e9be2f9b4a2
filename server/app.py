"""fedlora's ServerApp: builds the strategy from the run config and drives Flower's round loop.

:func:`run_server` is the whole server: it is what ``fedlora simulate`` runs inside Flower's
simulation engine and what the module-level ``app`` runs on a real deployment (the run config
travels as the ``config`` key of Flower's run config: a TOML path or inline JSON). Its parts, one
job each: :mod:`fedlora.server.global_model` (the model's structure, the exporter),
:mod:`fedlora.server.evaluation` (the server's evaluation), :mod:`fedlora.server.recorder` (the
metrics row per round, the checkpoint, the summary), the strategy (the round protocol) and the
run's extensions (:mod:`fedlora.extensions`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result

from fedlora import codec
from fedlora.aggregation.streaming import StreamingGrid, replies_per_pull
from fedlora.config import FedLoraConfig
from fedlora.lora_math import to_effective
from fedlora.protocol import NodeNames
from fedlora.registry import extensions_for, get_strategy
from fedlora.rundir import RunDir, atomic_write
from fedlora.server.evaluation import ServerEvaluation
from fedlora.server.global_model import GlobalModel, reference_rank
from fedlora.server.recorder import RoundRecorder
from fedlora.strategies.base import LoraStrategy

log = logging.getLogger("fedlora.server")


def run_server(
    grid: Grid,
    cfg: FedLoraConfig,
    run_dir: RunDir | None = None,
    on_round: Callable[[dict], None] | None = None,
    resume: bool = False,
    node_names: NodeNames | None = None,
) -> Result:
    """Run a whole federation on ``grid``; write metrics/adapters to ``run_dir`` if given.

    ``resume``: continue ``run_dir``'s run from its last checkpoint (the round after the last one
    completed, with the same round numbers, sampling and seeds as an uninterrupted run)."""
    t_start = time.perf_counter()
    extensions = extensions_for(cfg)
    for e in extensions:
        e.start_run()  # what the whole run must be able to do (a privacy target), also under `flwr run`
    evaluation = ServerEvaluation(cfg, extensions)
    gm = GlobalModel(cfg, evaluation.label_names, reference_rank(cfg))
    strategy = get_strategy(cfg.federation.strategy)(cfg, gm.template(), extensions=extensions)
    strategy.global_eff = strategy.initial_global(to_effective(gm.init))
    strategy.label_names = list(evaluation.label_names)
    strategy.node_names = node_names
    if resume:
        done = resume_strategy(strategy, cfg, run_dir)
        log.info("resuming %s after round %d of %d", run_dir.path if run_dir else "", done, cfg.run.rounds)
    if run_dir is not None and not resume:
        run_dir.write_config(cfg)
    if run_dir is not None and cfg.run.tensorboard:
        run_dir.enable_tensorboard()
    raw = codec.raw_bytes(gm.init.select(strategy.sharing_policy.shared), cfg.federation.wire_dtype)
    recorder = RoundRecorder(cfg, strategy, run_dir, on_round, raw)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's server-side evaluation callback: evaluate when due, then record the round."""
        if resume and server_round == 0:
            return None  # the resumed run's starting point is the checkpoint's last round, already logged
        server_round += strategy.round_offset
        found: dict = {}
        if cfg.federation.server_eval and strategy.has_global_model and evaluation.due(server_round):
            found = evaluation.row(gm.load(strategy), server_round, gm.device)  # one load serves every metric
        recorder.record(server_round, found)
        if "server-loss" in found:
            return MetricRecord(
                {
                    k: found[f"server-{k}"]
                    for k in ("accuracy", "loss", "perplexity")
                    if found.get(f"server-{k}") is not None and math.isfinite(found[f"server-{k}"])
                }
            )
        return None

    result = strategy.start(
        grid=StreamingGrid(grid, max_pull=replies_per_pull(cfg, strategy.template)),
        initial_arrays=codec.encode(strategy.global_eff),
        num_rounds=cfg.run.rounds - strategy.round_offset,
        timeout=cfg.federation.round_timeout,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
        evaluate_fn=evaluate_fn,
    )
    if run_dir is not None:
        gm.save(strategy, run_dir.path / "adapter")
        recorder.finish(evaluation.label_names, evaluation.baselines(), time.perf_counter() - t_start)
    return result


def resume_strategy(strategy: LoraStrategy, cfg: FedLoraConfig, run_dir: RunDir | None) -> int:
    """Load ``run_dir``'s checkpoint into ``strategy``; return the rounds it had completed."""
    if run_dir is None:
        raise ValueError("resume needs the run directory of the interrupted run")
    found = run_dir.read_checkpoint()
    if found is None:
        raise ValueError(f"{run_dir.path} holds no checkpoint (checkpoint/state.json): the run never finished a round")
    tensors, state = found
    if state.get("config-digest") != cfg.digest():
        raise ValueError(
            f"{run_dir.path}: its checkpoint was written by a run with a different config; resume "
            "runs the config.toml saved in the run directory, unchanged"
        )
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
    raise FileNotFoundError(
        f"run config {path!r} is relative and found neither in {Path.cwd()} (where Flower "
        f"runs the ServerApp) nor in the installed app under {home / 'apps'}; pass an absolute "
        f"path: --run-config \"config='$PWD/{path}'\", or use `fedlora server`"
    )


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
        from fedlora.deploy.prechecks import enrolled_keys

        names = EnrolledNodes(Path(folder) / "flwr-home", enrolled_keys(cfg))
        grid = EnrolledGrid(grid, names)
    run_server(
        grid,
        cfg,
        RunDir(folder) if folder else RunDir.create(cfg),
        resume=bool(rc.get("resume", False)),
        node_names=names,
    )
