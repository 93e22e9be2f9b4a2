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
from functools import partial
from pathlib import Path

from fedlora.deploy.processes import await_listener, peak_memory_mb  # stdlib only: nothing heavy before the warm-up
from fedlora.deploy.supernode_log import NODE_LOG

log = logging.getLogger("fedlora.client")
STARTED = "resident executor up, process"  # its first log line (task lines say "started in process")


def _warm(state_dir: Path, warmed: set[str], threads: int = 1) -> None:
    """Build this node's session for the run last set up: its data tokenized and its PEFT model
    built, both kept in fedlora's per-process caches, which every forked task inherits (or a
    :class:`TaskWorker`'s tasks use in its own process). ``threads``: torch threads while building,
    1 in a process that forks (see :func:`single_threaded_parent`)."""
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
    session = ClientSession.from_parts(
        FedLoraConfig.from_json(setup["run-config"]), setup["node-config"], int(setup["node-id"]), names
    )
    import torch

    torch.set_num_threads(threads)
    session.model()
    warmed.add(text)
    log.info(
        "run's base model (%s) and data loaded once, kept for its tasks (%.1f s); peak memory %.0f MB",
        session.cfg.model.name,
        time.perf_counter() - t0,
        peak_memory_mb(),
    )


def warm(state_dir: Path, warmed: set[str], threads: int = 1) -> None:
    """:func:`_warm`, where a failure is logged and not retried: a bad config is the task's to report
    (it fails the same way and answers with the reason), not the process's that serves tasks."""
    try:
        _warm(state_dir, warmed, threads)
    except Exception as exc:
        log.warning("could not preload the run's model: %s", exc)
        warmed.add(str(exc))


def setup_trains_on_cuda(state_dir: Path) -> bool:
    """Whether the run last set up on this node trains on a CUDA device (from its setup file, without
    creating a CUDA context: PyTorch asks NVML, see :func:`main`)."""
    from fedlora.clients.session import SETUP_FILE

    path = state_dir / SETUP_FILE
    if not path.exists():
        return False
    device = str(json.loads(json.loads(path.read_text())["run-config"]).get("train", {}).get("device", "auto"))
    if device.startswith("cuda"):
        return True
    if device != "auto":
        return False
    import torch

    return torch.cuda.is_available()


def withhold_replies_to_dropped_messages(node_log: Path, wait: float = 600.0) -> None:
    """Flower's ``run_clientapp``, in this process and the tasks it forks or serves, pushes a reply
    only once the SuperNode (its log, ``node_log``) kept the message the reply answers. Flower 1.42's
    SuperNode makes a task of a message whose run stops while it receives it, and does not remove it
    when it lets the message go; it pushes replies only after its next pull, all that are ready. Such
    a task's reply would go out in place of the next message's, which would then wait for the node's
    next message. A reply to a dropped message is withheld and logged. The SuperNode sends no reply
    before its verdict, so waiting for it costs nothing; with no verdict in ``wait`` seconds (a server
    down that long), or no receipt in the log, the reply goes out as Flower would send it."""
    from flwr.supernode.runtime import run_clientapp as flower_task

    from fedlora.deploy.supernode_log import DROPPED, await_verdict

    push = flower_task.push_message
    if getattr(push, "node_log", None) is not None:  # guarded already
        return

    def guarded_push(client, reply, context) -> None:
        answered = reply.metadata.reply_to_message_id
        if await_verdict(node_log, answered, wait) == DROPPED:
            log.warning("reply to message %s withheld: the SuperNode dropped that message (its run stopped)", answered)
            return
        push(client, reply, context)

    guarded_push.node_log = node_log  # type: ignore[attr-defined]
    flower_task.push_message = guarded_push


class TaskWorker:
    """One process that owns the model of one run and serves that run's tasks in turn, in-process:
    started with ``spawn`` (a fresh interpreter, nothing inherited), it builds the run's model once
    (on the GPU, for a CUDA run) and never forks, so CUDA is never carried across a fork. The
    resident executor uses it for runs that train on CUDA, or always with ``--executor worker``;
    a task that crashes it costs that task, and the next task starts a new worker."""

    def __init__(self, runtime_api_address: str, state_dir: Path, threads: int, run_id: int) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.run_id = run_id
        self.inbox, self.outbox = ctx.Queue(), ctx.Queue()
        self.process = ctx.Process(
            target=_worker_main,
            daemon=True,
            name="fedlora-task-worker",
            args=(runtime_api_address, str(state_dir), threads, self.inbox, self.outbox),
        )
        self.process.start()

    def submit(self, token: str, task_id: int) -> None:
        self.inbox.put((token, task_id))

    def finished(self) -> list[tuple[int, int, float]]:
        """(task id, exit code, the worker's peak MB) of each task done since the last call."""
        import queue

        out = []
        while True:
            try:
                out.append(self.outbox.get_nowait())
            except queue.Empty:
                break
        return out

    def alive(self) -> bool:
        return self.process.is_alive()

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(10)


def _worker_main(runtime_api_address: str, state_dir: str, threads: int, inbox, outbox) -> None:
    """A :class:`TaskWorker`'s process: warm the run's model, then serve each task handed over."""
    from fedlora.env import apply_defaults

    apply_defaults()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    import torch

    # Flower's run_clientapp ends its process when the task is done (flwr_exit: its exit handlers,
    # then os._exit after a timeout from a daemon thread). Here the process serves the next task:
    # the task ends with the same exit handlers (the task's final status is pushed, its heartbeat
    # stopped), and returns.
    from flwr.supercore.exit.exit_handler import trigger_exit_handlers
    from flwr.supernode.runtime import run_clientapp as flower_task

    from fedlora.deploy.reaper import die_with_parent

    def end_task(code: int, *args, **kwargs) -> None:
        trigger_exit_handlers(run_before_force_exit=True)
        trigger_exit_handlers(run_before_force_exit=False)
        raise SystemExit(int(code != 0))

    flower_task.flwr_exit = end_task
    withhold_replies_to_dropped_messages(Path(state_dir) / NODE_LOG)
    die_with_parent()
    torch.set_num_threads(threads)
    warmed: set[str] = set()
    while (item := inbox.get()) is not None:
        token, task_id = item
        warm(Path(state_dir), warmed, threads)  # once the run is set up: its model, built once, on its device
        log.info("task %s served in worker process %d", task_id, os.getpid())
        code = 0
        try:
            flower_task.run_clientapp(runtime_api_address, token, insecure=True, parent_pid=None)
        except SystemExit as exc:  # the task's end (end_task above)
            code = exc.code if isinstance(exc.code, int) else 1
        outbox.put((task_id, code, peak_memory_mb()))


def single_threaded_parent() -> int:
    """OpenMP's thread pool does not survive fork(): a child whose parent ever ran a parallel region
    waits forever in its first one. The executor computes single-threaded (it only loads and copies
    weights); each task gets the returned thread count back (:func:`fork_task`)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    return threads


def fork_task(task, threads: int) -> int:
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


def run_resident_executor(
    runtime_api_address: str, state_dir: str | Path, poll_seconds: float = 0.2, mode: str = "auto"
) -> None:
    """Serve the SuperNode's tasks until killed. ``mode``: "fork" runs each task in a child forked
    from this warm process; "worker" hands each task to a :class:`TaskWorker`; "auto" forks, except
    for a run that trains on CUDA (this process then never builds the model: CUDA does not survive
    a fork)."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    # Everything a task needs that does not depend on the run: imported once, here.
    import fedlora.clients.app
    import fedlora.training  # noqa: F401

    task_threads = single_threaded_parent()

    state_dir = Path(state_dir)
    withhold_replies_to_dropped_messages(state_dir / NODE_LOG)  # inherited by every forked task
    log.info("ready: fedlora, torch, transformers and PEFT imported once; peak memory %.0f MB", peak_memory_mb())
    # `fedlora client` starts this process before its SuperNode (which may wait for the server):
    # ask the SuperNode's Runtime API port until it listens rather than back off from a refusal.
    await_listener(runtime_api_address, math.inf, every=0.2)
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=True,
        root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    tasks = TaskProcesses()
    worker: TaskWorker | None = None
    task_peak = 0.0
    warmed: set[str] = set()
    stop = {"now": False}

    def on_term(signum, frame) -> None:
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
                    log.info(
                        "peak memory of a round's work so far: %.0f MB in its process (pages it shares "
                        "with the executor, now %.0f MB, included)",
                        task_mb,
                        peak_memory_mb(),
                    )
            if worker is not None:
                for task_id, code, mb in worker.finished():
                    if code:
                        log.warning(
                            "task %s ended with code %s in worker process %d", task_id, code, worker.process.pid
                        )
                    if mb > 1.05 * task_peak:
                        task_peak = mb
                        log.info("peak memory of a round's work so far: %.0f MB in its worker process", mb)
                if not worker.alive():
                    log.warning(
                        "worker process %d exited (code %s); the next task starts a new one",
                        worker.process.pid,
                        worker.process.exitcode,
                    )
                    worker = None
            use_worker = mode == "worker" or (mode == "auto" and setup_trains_on_cuda(state_dir))
            if not use_worker:
                warm(state_dir, warmed)
            res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            if not (res.HasField("task") and res.token):
                time.sleep(poll_seconds)
                continue
            token, run_id = res.token, res.task.run_id
            for pid, run in tasks.end_other_runs(run_id):
                log.info("task in process %d ended: its run %s was stopped (run %s has started)", pid, run, run_id)
            if worker is not None and worker.run_id != run_id:
                log.info(
                    "worker process %d ended: its run %s was stopped (run %s has started)",
                    worker.process.pid,
                    worker.run_id,
                    run_id,
                )
                worker.stop()
                worker = None
            if use_worker:
                if worker is None:
                    worker = TaskWorker(runtime_api_address, state_dir, task_threads, run_id)
                    log.info(
                        "run %s's tasks go to worker process %d (it loads the model once)", run_id, worker.process.pid
                    )
                worker.submit(token, res.task.task_id)
                continue
            pid = fork_task(
                partial(run_clientapp, runtime_api_address, token, insecure=True, parent_pid=parent), task_threads
            )
            tasks.add(pid, run_id)
            log.info("task %s (run %s) started in process %d", res.task.task_id, run_id, pid)
    finally:
        tasks.stop_all()
        if worker is not None:
            worker.stop()
        client.close()


def main() -> None:  # python -m fedlora.deploy.executor ADDRESS STATE_DIR [fork|worker|auto]
    from fedlora.env import apply_defaults

    apply_defaults()
    # torch.cuda.is_available() then asks NVML and creates no CUDA context here (it would not survive
    # the forks of the CPU path).
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Runtime API poll otherwise
    log.info("%s %d, for the SuperNode at %s", STARTED, os.getpid(), sys.argv[1])
    run_resident_executor(sys.argv[1], sys.argv[2], mode=sys.argv[3] if len(sys.argv) > 3 else "auto")


if __name__ == "__main__":
    main()
