"""`fedlora simulate`: many virtual clients on one machine with Flower's simulation engine."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from fedlora.config import FedLoraConfig
from fedlora.env import apply_defaults
from fedlora.privacy.accounting import check_targets
from fedlora.rundir import RunDir


class PartitionNames:
    """A simulation's node -> client id binding: a virtual client's id is its partition's
    (:func:`fedlora.protocol.partition_client_id`), the partition the engine gave its node, whatever
    id its profile declares (the strategy flags a different one and uses this). ``partitions``: node
    id -> partition id, filled by the engine's own node registration."""

    binding = "the simulation engine gave it the partition whose client id is"

    def __init__(self) -> None:
        self.partitions: dict[int, int] = {}

    def __call__(self, node: int) -> str | None:
        from fedlora.protocol import partition_client_id

        partition = self.partitions.get(node)
        return None if partition is None else partition_client_id(partition)


@contextmanager
def _recording_partitions(names: PartitionNames) -> Iterator[None]:
    """Flower's simulation engine registers its nodes (random ids) and maps each to a partition in
    ``vce_api._register_nodes``, which the ServerApp cannot see; record that mapping as it is made.
    A Flower without that function fails here, loudly, rather than running with ids unbound."""
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api._register_nodes

    def register(num_nodes, state_factory):
        mapping = original(num_nodes, state_factory)
        names.partitions.update(mapping)
        return mapping

    vce_api._register_nodes = register
    try:
        yield
    finally:
        vce_api._register_nodes = original


def simulate(
    cfg: FedLoraConfig,
    run_dir: RunDir | None = None,
    on_round: Callable[[dict], None] | None = None,
    verbose: bool = False,
    client_app=None,
    wrap_grid: Callable | None = None,
    engine: str = "ray",
) -> RunDir:
    """Run ``cfg`` as a simulation; return the run directory (metrics, adapters, plot).

    ``client_app`` replaces fedlora's ClientApp (e.g. a client that misbehaves, for fault tests);
    ``wrap_grid`` receives Flower's Grid and returns the grid the server uses (e.g. one that
    records every message, for wire inspection). ``engine``: "ray", Flower's simulation engine, or
    "inprocess", the same ServerApp and ClientApp on :class:`fedlora.inprocess.InProcessGrid`
    (one process, clients in turn: for tests and debugging).
    """
    if engine not in ("ray", "inprocess"):
        raise ValueError(f"engine must be 'ray' or 'inprocess', got {engine!r}")
    apply_defaults()
    # Flower, torch and the apps load when a run starts, not when the CLI or a config check imports this.
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    if client_app is None:
        from fedlora.clients.app import app as client_app
    from fedlora.server.app import run_server

    cfg.data.check_local_paths()  # before a run directory exists, not from inside the data loader
    run_dir = run_dir or RunDir.create(cfg)
    if not cfg.simulation.state_dir:
        cfg.simulation.state_dir = str((run_dir.path / "client_state").resolve())
    if not cfg.model.cache_dir:
        # Workers must share one cache: resolve it once here, not per process.
        from fedlora.model import cache_root

        cfg.model.cache_dir = str(cache_root())
    # Prepare shared artefacts once in the driver (model extraction, tokenization) so workers only read.
    from fedlora.data import load_task
    from fedlora.partitions import partition_indices

    partition_indices(cfg, load_task(cfg).train_labels)

    check_targets(cfg)  # privacy calibration runs here, when the run starts, not in config validation
    from fedlora.model import check_device
    from fedlora.training import pick_device

    check_device(cfg, pick_device(cfg.train.device))  # e.g. a quantized base on a machine without CUDA

    server_app = ServerApp()
    names = PartitionNames()  # ids bound to nodes, as enrolled keys bind them in a deployment

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_server(wrap_grid(grid) if wrap_grid else grid, cfg, run_dir, on_round=on_round, node_names=names)

    if engine == "inprocess":
        from fedlora.inprocess import node_partitions, run_in_process

        names.partitions.update(node_partitions(cfg.federation.num_clients))
        run_in_process(server_app, client_app, cfg.federation.num_clients)
        if not (run_dir.path / "summary.json").exists():
            raise RuntimeError(f"the in-process run ended without finishing its rounds; see {run_dir.path}")
        return run_dir
    if not verbose:
        for name in ("flwr", "ray"):
            logging.getLogger(name).setLevel(logging.ERROR)
    init_args = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.ERROR}
    if os.environ.get("RAY_ADDRESS"):
        # Ray's own convention: a running cluster (`ray start --head`, one machine or many) hosts the
        # virtual clients; it keeps running after the run, and its size is its own.
        init_args["address"] = os.environ["RAY_ADDRESS"]
    else:
        init_args.update({"num_cpus": os.cpu_count() or 1, "include_dashboard": False})
    backend = {
        "client_resources": {
            "num_cpus": cfg.simulation.num_cpus_per_client,
            "num_gpus": cfg.simulation.num_gpus_per_client,
        },
        "init_args": init_args,
    }
    with warnings.catch_warnings(), _recording_partitions(names):
        warnings.simplefilter("ignore")  # run_simulation's deprecation notice; the engine is the same
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=cfg.federation.num_clients,
            backend_config=backend,
            verbose_logging=verbose,
        )
    if not (run_dir.path / "summary.json").exists():
        raise RuntimeError(f"the simulation ended without finishing its rounds; see {run_dir.path}")
    return run_dir
