"""The resident executor of `fedlora client`: the base model stays loaded between rounds.

Flower's SuperNode starts a fresh ``flwr-clientapp`` process for every message (subprocess
isolation): each train or evaluate message would re-import torch, transformers and PEFT and
re-read the base weights. With ``--isolation process`` the SuperNode leaves launching to an
executor that asks its Runtime API for tasks. This one does what Flower's ``flower-superexec``
does, with one difference: it imports fedlora once, and once a run's config is known (the setup
message leaves it in the node's state folder, :data:`~fedlora.clients.session.SETUP_FILE`) it builds that run's base model once; every task then
runs Flower's own ``run_clientapp`` in a forked child, which inherits the warm model
copy-on-write. A crash or a kill in a child ends that task only, as in Flower's isolation.

Relies on Flower's Runtime API client (flwr 1.41-1.42, the versions pyproject allows);
``fedlora client --cold`` falls back to Flower's own per-message processes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import signal
import sys
import time
from pathlib import Path

from fedlora.deploy.processes import await_listener, peak_memory_mb  # stdlib only: nothing heavy before the warm-up

log = logging.getLogger("fedlora.client")
STARTED = "resident executor up, process"  # its first log line (task lines say "started in process")

def _warm(state_dir: Path, warmed: set[str]) -> None:
    """Build this node's session for the run last set up: its data tokenized and its PEFT model
    built, both kept in fedlora's per-process caches, which every forked task inherits."""
    # lazy, here and below: this module is the executor's entry point; what it imports is what the
    # parent loads once, at the moment it chooses, for its forked tasks to inherit.
    from fedlora.clients.session import SETUP_FILE, ClientSession
    from fedlora.config import FedLoraConfig

    path = state_dir / SETUP_FILE
    if not path.exists():
        return
    text = path.read_text()
    if text in warmed:
        return
    t0 = time.perf_counter()
    setup = json.loads(text)
    names = json.loads(setup["label-names"]) if "label-names" in setup else None
    session = ClientSession.from_parts(FedLoraConfig.from_json(setup["run-config"]), setup["node-config"],
                                       int(setup["node-id"]), names)
    import torch

    torch.set_num_threads(1)  # see run_resident_executor: the parent never starts a thread pool
    session.model()
    warmed.add(text)
    log.info("run's base model (%s) and data loaded once, kept for its tasks (%.1f s); peak memory %.0f MB",
             session.cfg.model.name, time.perf_counter() - t0, peak_memory_mb())


def single_threaded_parent() -> int:
    """OpenMP's thread pool does not survive fork(): a child whose parent ever ran a parallel region
    waits forever in its first one. The executor computes single-threaded (it only loads and copies
    weights); each task gets the returned thread count back (:func:`fork_task`)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    return threads


def fork_task(task, threads: int) -> int:  # noqa: ANN001
    """Run ``task()`` in a forked child with ``threads`` torch threads; return the child's pid. The
    child dies with this process and exits with the task's code (Flower ends a task with sys.exit)."""
    pid = os.fork()
    if pid != 0:
        return pid
    code = 1
    try:
        import torch

        from fedlora.deploy.reaper import die_with_parent

        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        die_with_parent()
        torch.set_num_threads(threads)  # train.num_threads, if set, applies inside the task
        task()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class TaskProcesses:
    """The executor's forked tasks, by the run each serves.

    fedlora server runs one run at a time on its SuperLink: it stops every unfinished run before it
    submits one. A task still running for another run when a new run's task arrives therefore serves
    a stopped run, and its reply can count for nothing. Flower 1.42's SuperNode does not end such a
    task: in the resume drill (a server killed mid-round) one took its round's message just before
    the kill and was still alive, holding its memory, 95 s after the resumed run had finished. It is
    ended here, when the new run's first task arrives."""

    def __init__(self) -> None:
        self.run_of: dict[int, int] = {}  # pid -> run id
        self.ending: set[int] = set()

    def add(self, pid: int, run_id: int) -> None:
        self.run_of[pid] = run_id

    def reap(self) -> list[tuple[int, resource.struct_rusage]]:
        """The tasks that ended since the last call, with their resource usage."""
        ended = []
        for pid in list(self.run_of):
            done, _, usage = os.wait4(pid, os.WNOHANG)
            if done:
                del self.run_of[pid]
                self.ending.discard(pid)
                ended.append((pid, usage))
        return ended

    def end_other_runs(self, run_id: int) -> list[tuple[int, int]]:
        """SIGTERM every task serving a run other than ``run_id``; return (pid, its run) of each."""
        stale = [(pid, run) for pid, run in self.run_of.items() if run != run_id and pid not in self.ending]
        for pid, _ in stale:
            _terminate(pid)
            self.ending.add(pid)
        return stale

    def stop_all(self) -> None:
        for pid in self.run_of:
            _terminate(pid)


def _terminate(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:  # already gone
        pass


def run_resident_executor(runtime_api_address: str, state_dir: str | Path, poll_seconds: float = 0.2) -> None:
    """Serve the SuperNode's tasks until killed; each task runs in a forked child."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # noqa: PLC0415
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    # Everything a task needs that does not depend on the run: imported once, here.
    import fedlora.clients.app  # noqa: F401
    import fedlora.training  # noqa: F401

    task_threads = single_threaded_parent()

    state_dir = Path(state_dir)
    log.info("ready: fedlora, torch, transformers and PEFT imported once; peak memory %.0f MB", peak_memory_mb())
    # `fedlora client` starts this process before its SuperNode (which may wait for the server):
    # ask the SuperNode's Runtime API port until it listens rather than back off from a refusal.
    await_listener(runtime_api_address, math.inf, every=0.2)
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    tasks = TaskProcesses()
    task_peak = 0.0
    warmed: set[str] = set()
    stop = {"now": False}

    def on_term(signum, frame) -> None:  # noqa: ANN001
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    parent = os.getpid()
    try:
        while not stop["now"]:
            for _, usage in tasks.reap():
                # The training peak is a task's, not this process's (which only loads): said when a
                # task sets a new high by 5% or more, so the console gets a line or two a run.
                task_mb = peak_memory_mb(usage.ru_maxrss)
                if task_mb > 1.05 * task_peak:
                    task_peak = task_mb
                    log.info("peak memory of a round's work so far: %.0f MB in its process (pages it shares "
                             "with the executor, now %.0f MB, included)", task_mb, peak_memory_mb())
            try:
                _warm(state_dir, warmed)
            except Exception as exc:  # noqa: BLE001 - a bad config is the task's to report, not ours
                log.warning("could not preload the run's model: %s", exc)
                warmed.add(str(exc))
            res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            if not (res.HasField("task") and res.token):
                time.sleep(poll_seconds)
                continue
            token = res.token
            for pid, run in tasks.end_other_runs(res.task.run_id):
                log.info("task in process %d ended: its run %s was stopped (run %s has started)", pid, run,
                         res.task.run_id)
            pid = fork_task(lambda: run_clientapp(runtime_api_address, token, insecure=True, parent_pid=parent),
                            task_threads)
            tasks.add(pid, res.task.run_id)
            log.info("task %s (run %s) started in process %d", res.task.task_id, res.task.run_id, pid)
    finally:
        tasks.stop_all()
        client.close()


def main() -> None:  # python -m fedlora.deploy.executor ADDRESS STATE_DIR
    from fedlora.env import apply_defaults

    apply_defaults()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Runtime API poll otherwise
    log.info("%s %d, for the SuperNode at %s", STARTED, os.getpid(), sys.argv[1])
    run_resident_executor(sys.argv[1], sys.argv[2])


if __name__ == "__main__":
    main()
