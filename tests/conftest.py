"""Shared test setup: offline, no telemetry, a private FLWR_HOME and fedlora cache per session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Before anything imports Flower, Ray or Hugging Face.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch (OpenMP) thread per process: the suite runs three xdist workers and the processes they
# start on two cores, and OpenMP's spinning threads, oversubscribed, slow each other several-fold.
# A test of thread settings sets its own.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("FLWR_HOME", tempfile.mkdtemp(prefix="fedlora-flwr-home-"))

# ../shared/data beside the checkout; FEDLORA_SHARED_DATA names it for a copy of the tests elsewhere
# (the mutation harness runs them from a scratch folder).
SHARED_DATA = Path(
    os.environ.get("FEDLORA_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data"
)

# Property tests: 40 examples each in the suite; a handful per mutant under mutation testing
# (benchmarks/mutation.py sets FEDLORA_HYPOTHESIS=mutation), where they run once per mutant.
from hypothesis import Phase, settings  # noqa: E402

settings.register_profile("suite", max_examples=40, deadline=None)
# No shrinking under mutation testing: a mutant that fails a property test is killed by the first
# failing example; shrinking it (minutes on a loaded machine) only turned kills into timeouts.
settings.register_profile(
    "mutation", max_examples=6, deadline=None, database=None, phases=[Phase.explicit, Phase.reuse, Phase.generate]
)
settings.load_profile(os.environ.get("FEDLORA_HYPOTHESIS", "suite"))


# The suite's schedule on three xdist workers (`-n 3 --dist loadfile`): whole files, heaviest first, so
# that the long files start at once and the short ones fill in at the end (longest-first scheduling).
# Heaviest: the files that start real processes (deployments, Ray simulations), then the longest
# in-process federations; `pytest --durations=0` says which they are now.
HEAVIEST_FILES_FIRST = (
    "test_deploy.py",
    "test_deploy_faults.py",
    "test_hostile.py",  # its straggler idles 47 s: early, while the others compute
    "test_simulation.py",
    "test_causal.py",
    "test_privacy.py",
    "test_continual.py",
)


def pytest_configure(config: pytest.Config) -> None:
    # xdist's own reordering (files with the most tests first) would undo the order given below.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    place = {name: i for i, name in enumerate(HEAVIEST_FILES_FIRST)}
    items.sort(key=lambda item: place.get(item.path.name, len(place)))  # stable: a file keeps its order


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "index.json").exists():
        pytest.skip(
            f"../shared/data is absent ({SHARED_DATA}); it ships beside the project in CI, not in a user's clone"
        )
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_cluster():
    """One real Ray cluster (`ray start --head`) that every simulation of the session runs its virtual
    clients on, through RAY_ADDRESS as a user's cluster would (fedlora.simulate). Each simulation still
    starts its own actors and ends them; what is shared is Ray's own start and stop, about a third of a
    small simulation's time. Started by the first test that asks for it: the tests that run Flower's
    engine (the in-process grid needs no Ray); FEDLORA_TEST_PRIVATE_RAY=1 gives each simulation a
    private instance instead."""
    if os.environ.get("RAY_ADDRESS") or os.environ.get("FEDLORA_TEST_PRIVATE_RAY"):
        yield os.environ.get("RAY_ADDRESS")
        return
    import psutil

    from fedlora.deploy.processes import free_port

    ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    temp = tempfile.mkdtemp(prefix="fr-", dir="/tmp")  # Ray's socket paths must stay short
    port = free_port()
    # Every process of this cluster inherits this mark: some name neither the temp dir nor 127.0.0.1
    # on their command line (Ray's client server names the machine's address), so it finds them.
    mark = {"FEDLORA_TEST_RAY_CLUSTER": temp}
    subprocess.run(
        [
            ray,
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--num-cpus={os.cpu_count() or 1}",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={temp}",
        ],
        check=True,
        capture_output=True,
        timeout=180,
        env={**os.environ, **mark},
    )
    os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    try:
        yield os.environ["RAY_ADDRESS"]
    finally:
        del os.environ["RAY_ADDRESS"]

        # This cluster's processes only (`ray stop` would end every Ray on the machine).
        def ours(p: psutil.Process) -> bool:
            try:
                return (
                    any(temp in a for a in (p.info["cmdline"] or []))
                    or p.environ().get("FEDLORA_TEST_RAY_CLUSTER") == temp
                )
            except psutil.Error:  # gone, or not ours to read
                return False

        found = [p for p in psutil.process_iter(["cmdline"]) if p.pid != os.getpid() and ours(p)]
        # ... and their children, found before any is killed: a renamed agent's own command line and
        # environment are overwritten by its new title, and once its raylet is gone it is nobody's.
        mine = {p.pid: p for p in found}
        for p in found:
            try:
                mine.update({c.pid: c for c in p.children(recursive=True)})
            except psutil.Error:
                pass
        mine = list(mine.values())
        for p in mine:  # SIGKILL: Ray's daemons outwait a SIGTERM by seconds, and nothing of theirs is kept
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(mine, timeout=10)
        shutil.rmtree(temp, ignore_errors=True)


def make_config(tmp_path: Path, **sections):
    """A small, fast config: tiny BERT (random) unless a test asks for MiniLM."""
    from fedlora.config import FedLoraConfig

    raw = {
        "run": {"name": "test", "output_dir": str(tmp_path / "runs"), "rounds": 2, "seed": 7},
        "model": {"name": "builtin:tiny-bert", "max_length": 32},
        "lora": {"rank": 4, "alpha": 8},
        "data": {
            "dataset": str(SHARED_DATA / "agnews"),
            "max_train_examples": 240,
            "max_test_examples": 120,
            "partitioner": "iid",
        },
        "federation": {"num_clients": 3, "min_train_clients": 2, "min_evaluate_clients": 2, "evaluate_every": 1},
        "train": {"local_epochs": 1, "batch_size": 16, "learning_rate": 3e-3},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return FedLoraConfig.from_dict(raw)


def continual_config(tmp_path: Path, method: str, **sections):
    """A two-task sequence (agnews, then dbpedia; one round each, two clients) of ``make_config``'s
    small run under ``continual.method = method``; ``sections`` replace whole sections."""
    from fedlora.config import FedLoraConfig

    raw = make_config(tmp_path).to_dict()
    raw["run"]["rounds"] = 2
    raw["federation"].update({"num_clients": 2, "min_train_clients": 2})
    raw["continual"] = {
        "method": method,
        "tasks": [
            {"name": "agnews", "dataset": str(SHARED_DATA / "agnews"), "rounds": 1},
            {"name": "dbpedia", "dataset": str(SHARED_DATA / "dbpedia"), "rounds": 1},
        ],
    }
    raw.update(sections)
    return FedLoraConfig.from_dict(raw)


@pytest.fixture
def task_identity():
    """Flower sets a process's run identity before it builds Messages; do the same for handler tests."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = old


@pytest.fixture
def creds(tmp_path: Path):
    """Test credentials for a deployment on 127.0.0.1: a CA, a server certificate, 5 node key pairs."""
    from fedlora.deploy.pki import create_credentials

    return create_credentials(tmp_path / "creds", ["127.0.0.1", "localhost"], nodes=5)
