"""The crashes a real federation meets, on Flower's deployment runtime with TLS and node
authentication on: a server SIGKILLed and resumed, a SuperLink killed and restarted on its
database, a client killed in the middle of a round."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time

import pytest

from deployment import (
    assert_same_factors,
    cli,
    final_factors,
    kill_group,
    rows,
    run_dir_of,
    server_config,
    simulation_of,
    start_clients,
    wait_for,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process tests use Linux signals")


def test_server_killed_and_resumed_and_superlink_restarted_finish_as_an_uninterrupted_run(tmp_path, creds):
    import psutil

    from fedlora.deploy.processes import free_port

    port = free_port()
    # Training rounds only (federated evaluation has its own deployed test in test_deploy.py): what is resumed is
    # the global adapter, the strategy's state and the metrics.
    # No round here should time out: the limit is room for a node's setup (it loads the model) on a
    # loaded two-core machine.
    config = server_config(tmp_path, creds, port, rounds=3, fraction_evaluate=0.0, round_timeout=240.0)
    server = cli("server", "-c", str(config), log=tmp_path / "server.log")
    clients = start_clients(tmp_path, creds, port)
    logs = [tmp_path / "server.log", tmp_path / "client0.log"]
    try:
        run = wait_for(lambda: run_dir_of(tmp_path), 60, "the run directory", logs)
        # 1. The SuperLink dies after round 1: `fedlora server` restarts it on its database and resumes.
        wait_for(lambda: any(r["round"] == 1 for r in rows(run)), 240, "round 1", logs)
        links = [
            c
            for c in psutil.Process(server.pid).children(recursive=True)
            if any(x.endswith("flower-superlink") for x in c.cmdline()[:2])
        ]  # the daemon, not its reaper
        assert len(links) == 1
        links[0].kill()

        # 2. The server itself is SIGKILLed once round 2 is checkpointed...
        def checkpointed(n: int) -> bool:
            p = run / "checkpoint" / "state.json"
            return p.exists() and json.loads(p.read_text())["last-round"] >= n

        wait_for(lambda: checkpointed(2), 300, "round 2's checkpoint", logs)
        # kill -9 of `fedlora server` alone (not its group): every process it started, the SuperLink's
        # helpers (flower-superexec, flwr-serverapp) included, must end with it.
        tree = psutil.Process(server.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()[:2]) for p in tree)
        assert "flower-superexec" in names or "flwr-serverapp" in names, names  # the helpers were there
        os.kill(server.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        server.wait(10)
        _, alive = psutil.wait_procs(tree, timeout=30)
        assert not alive, f"outlived their server: {[' '.join(p.cmdline()[:3]) for p in alive]}"
        # ... and `fedlora server --resume` finishes round 3.
        resumed = cli("server", "--resume", str(run), log=tmp_path / "resumed.log")
        wait_for(lambda: "submitted" in (tmp_path / "resumed.log").read_text(), 120, "the resumed run", logs)
        resubmitted_after = time.monotonic() - killed_at
        assert resumed.wait(600) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
        # Every task process the devices' executors started has ended, those that served a stopped
        # run included (a node that took the killed server's last message ends it when the resumed
        # run's first task arrives).
        task_pids = [
            int(x)
            for i in range(3)
            for x in re.findall(r"started in process (\d+)", (tmp_path / f"state{i}" / "executor.log").read_text())
        ]
        assert len(task_pids) >= 18, task_pids  # each device: a setup for each of the 3 runs, a training a round

        def task_alive(pid: int) -> bool:
            try:
                return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return False

        wait_for(lambda: not any(task_alive(p) for p in task_pids), 15, "the devices' task processes to end", logs)
    finally:
        for p in [server, *clients]:
            kill_group(p, signal.SIGTERM)
    out = (tmp_path / "server.log").read_text()
    assert "restarting it on its database" in out and "resumes the run" in out
    # The dead ServerApp's run is stopped before the new one is submitted (else nodes that take its
    # undelivered messages wait about 45 s on them), and Flower's `flwr log` error panel is not echoed.
    assert "stopped: its ServerApp is gone" in out and "╭" not in out, out
    # ... and before the devices can reach the SuperLink again: a device lets a message of a stopped
    # run go (Flower's SuperNode keeps it as a task, whose reply the executor then withholds) only
    # when the kill cut its receipt short, which no order of the server's can prevent.
    for i in range(3):
        node_log = (tmp_path / f"state{i}" / "supernode.log").read_text()
        for let_go in re.finditer(r"Ignoring message ([0-9a-f]+)", node_log):
            received = node_log.rfind(f"(ID: {let_go.group(1)})", 0, let_go.start())
            assert "Connection attempt failed" in node_log[received : let_go.start()], node_log[-3000:]
    gate = (run / "gate.log").read_text()
    # started, restarted, resumed; one line per failed forward, none per forwarded call
    assert gate.count("gate ready") == 3 and "Traceback" not in gate and "HTTP Request" not in gate, gate[-3000:]
    resumed_out = (tmp_path / "resumed.log").read_text()
    assert "round 3" in resumed_out
    # The killed server's run is still unfinished when the resumed server comes back within Flower's
    # ServerApp heartbeat lapse (about 45 s; later, Flower has finished it itself): stopped and said.
    if resubmitted_after < 40:
        assert "stopped: its ServerApp is gone" in resumed_out, (resubmitted_after, resumed_out)
    assert "Error" not in resumed_out, resumed_out  # the killed server's last log lines are not echoed again
    assert [r["round"] for r in rows(run)] == [0, 1, 2, 3]
    sim = simulation_of(config, tmp_path)
    assert_same_factors(final_factors(run), final_factors(sim))
    assert rows(run)[-1]["server-accuracy"] == pytest.approx(rows(sim)[-1]["server-accuracy"], abs=1e-6)


def test_client_killed_mid_round_the_round_completes_with_the_others(tmp_path, creds):
    from fedlora.deploy.processes import free_port

    port = free_port()
    # Round 1 starts once all three are connected (min_available_clients), so it samples client 2;
    # no federated evaluation (it would wait on the dead client again): the server's own evaluation
    # shows the round's result.
    config = server_config(
        tmp_path,
        creds,
        port,
        rounds=1,
        min_train_clients=2,
        min_available_clients=3,
        fraction_evaluate=0.0,
        round_timeout=60.0,
    )
    server = cli("server", "-c", str(config), log=tmp_path / "server.log")
    clients = start_clients(tmp_path, creds, port)
    logs = [tmp_path / "server.log", tmp_path / "client2.log"]
    try:
        # Client 2's second task is its round-1 training (the first is the setup): kill it then.
        ex_log = tmp_path / "state2" / "executor.log"
        wait_for(
            lambda: ex_log.exists() and ex_log.read_text().count("started in process") >= 2,
            240,
            "client 2's training task",
            logs + [ex_log],
        )
        kill_group(clients[2])
        assert server.wait(300) == 0, (tmp_path / "server.log").read_text()[-3000:]
    finally:
        for p in [server, *clients]:
            kill_group(p, signal.SIGTERM)
    # Round 1, which client 2 was killed in, completes with the other two.
    run_rows = rows(run_dir_of(tmp_path))
    assert [x["round"] for x in run_rows] == [0, 1], run_rows
    r = run_rows[1]
    # Named once, by its client id, for what ended the wait (Flower's heartbeat verdict, answered by the
    # SuperLink in the node's place; the SuperLink's verdicts on a reply whose upload the kill cut short;
    # or the round timeout), and no node that is not in the federation. The other two are accepted: a
    # cut upload does not hold their replies past the round's timeout.
    assert len(r["rejected"]) == 1 and "client node-2 (node " in r["rejected"][0], r["rejected"]
    why = ("no reply", "Node Unavailable", "Message Unavailable", "Reply message objects are unavailable")
    assert any(w in r["rejected"][0] for w in why), r
    assert r["clients-sampled"] == 3 and r["clients-accepted"] == 2 and r["server-accuracy"] is not None, r
