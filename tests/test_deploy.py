"""Real federations on Flower's deployment runtime: `fedlora server` and `fedlora client` as real
processes on 127.0.0.1 (SuperLink, SuperNodes, ServerApp, resident executors), TLS and node
authentication on, and the crashes a deployment meets: a server SIGKILLed and resumed, a SuperLink
killed and restarted on its database, a client killed in the middle of a round."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from conftest import SHARED_DATA, make_config
from deployment import (
    OUTSIDER_APP,
    assert_same_factors,
    cli,
    final_factors,
    kill_group,
    outsider_attempts,
    rows,
    run_dir_of,
    server_config,
    simulation_of,
    start_clients,
    wait_for,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process tests use Linux signals")


def test_federation_with_tls_and_node_auth_matches_simulation_and_refuses_unenrolled(tmp_path, creds):
    from fedlora.deploy.processes import free_port

    port = free_port()
    config = server_config(tmp_path, creds, port, rounds=2)
    server = cli("server", "-c", str(config), log=tmp_path / "server.log")
    # Device 1 declares device 0's client id: identity is the enrolled key, so it stays node-1. Device 2
    # runs its tasks as a CUDA run would: in one spawned worker process that never forks.
    clients = start_clients(tmp_path, creds, port, ids={1: "node-0"}, flags={2: ["--executor", "worker"]})
    # A fourth device whose key the server never enrolled: refused, and it gives up (max_retries 0).
    intruder_settings = tmp_path / "intruder.toml"
    intruder_settings.write_text(
        f'server = "127.0.0.1:{port}"\nroot_certificates = "{creds.ca_cert}"\n'
        f'node_key = "{creds.nodes[3].private_key}"\npartition_id = 0\n'
        f'state_dir = "{tmp_path / "state-intruder"}"\nmax_retries = 0\n'
    )
    logs = [tmp_path / "server.log", tmp_path / "client0.log"]
    try:
        wait_for(lambda: "SuperLink serving" in (tmp_path / "server.log").read_text(), 60, "the SuperLink", logs)
        intruder = cli("client", "--settings", str(intruder_settings), log=tmp_path / "intruder.log")
        # A fifth key registered on the SuperLink behind fedlora's back, as the operator could (the
        # Control API through `fedlora control`): the SuperLink lets its node in; fedlora does not.
        sneaked = subprocess.run(
            [
                sys.executable,
                "-m",
                "fedlora.cli",
                "control",
                str(run_dir_of(tmp_path)),
                "--",
                str(Path(sys.executable).parent / "flwr"),
                "supernode",
                "register",
                str(creds.nodes[4].public_key),
                "fedlora",
                "--name",
                "node-4",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert sneaked.returncode == 0, sneaked.stdout + sneaked.stderr
        clients += start_clients(tmp_path, creds, port, which=[4])
        outsider = outsider_attempts(tmp_path, creds, port)
        assert server.wait(300) == 0, (tmp_path / "server.log").read_text()[-3000:]
        assert intruder.wait(60) != 0
    finally:
        for p in [server, *clients]:
            kill_group(p, signal.SIGTERM)
    run = run_dir_of(tmp_path)
    out = (tmp_path / "server.log").read_text()
    assert "TLS, node authentication on" in out and "round 2" in out
    node_log = (tmp_path / "state-intruder" / "supernode.log").read_text()
    assert "failed to activate supernode" in node_log.lower(), node_log[-2000:]
    # ... and its owner reads why, once, with the file the operator needs.
    console = (tmp_path / "intruder.log").read_text()
    pub = tmp_path / "state-intruder" / "node-3.pub"  # derived from the device's key: the file to send the operator
    assert console.count(f"the server does not know this node's key: ask the operator to enrol {pub}") == 1, console
    assert pub.read_text().split()[:2] == creds.nodes[3].public_key.read_text().split()[:2]
    assert "ref-exit-codes" not in console, console
    # A second identity holding only ca.crt, at the devices' address: it cannot list runs, enrol a key
    # or submit an app (the gate answers 403), and the key it tried to register never trained.
    for (what, door), (code, text) in outsider.items():
        assert code != 0, (what, door, text)
        assert "403" in text or "devices only" in text, (what, door, text[-1500:])
    gate_log = (run / "gate.log").read_text()
    assert "refused POST /v1/control/" in gate_log and "refused POST /v1/fleet/%2e%2e/%2e%2e/v1/control/" in gate_log
    # The key registered behind fedlora's back: named with its fingerprint, never sampled, never sent a task.
    blob = base64.b64decode(creds.nodes[4].public_key.read_text().split()[1])
    fingerprint = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    assert re.search(rf"node \d+ refused: its key {re.escape(fingerprint)} is not enrolled", out), out[-3000:]
    assert "started in process" not in (tmp_path / "state4" / "executor.log").read_text()
    assert not any(r.get("clients-sampled", 0) > 3 for r in rows(run))
    dep_rows = rows(run)
    assert [r["round"] for r in dep_rows] == [0, 1, 2]
    assert all(r["clients-accepted"] == 3 for r in dep_rows[1:])
    flagged = [x for r in dep_rows for x in (r.get("flagged") or [])]
    assert any("declares client id 'node-0'; its key is enrolled as 'node-1'" in x for x in flagged), flagged
    sim = simulation_of(config, tmp_path)
    sim_rows = rows(sim)
    gain = dep_rows[-1]["server-accuracy"] - dep_rows[0]["server-accuracy"]
    sim_gain = sim_rows[-1]["server-accuracy"] - sim_rows[0]["server-accuracy"]
    assert gain == pytest.approx(sim_gain, abs=1e-6)
    assert_same_factors(final_factors(run), final_factors(sim))
    # the adapter PEFT loads
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    # Device 2's tasks (setup, 2 trainings, 2 evaluations) were all served by one worker process that
    # its executor spawned, never by a fork of the executor; its factors entered the run above, which
    # equals the simulation.
    ex2 = (tmp_path / "state2" / "executor.log").read_text()
    workers = set(re.findall(r"served in worker process (\d+)", ex2))
    assert len(workers) == 1 and len(re.findall(r"served in worker process", ex2)) >= 3, ex2[-3000:]
    # the model was built once, by the worker: the executor itself never built it (on a GPU it would
    # hold a CUDA context, which no fork carries)
    assert "started in process" not in ex2 and ex2.count("base model (builtin:tiny-bert) and data loaded once") == 1, (
        ex2[-3000:]
    )
    executor_pid = re.search(r"resident executor up, process (\d+)", ex2).group(1)
    assert workers != {executor_pid}
    # A device's console reports the training process's peak memory, not only the loader's.
    peaks = re.findall(r"peak memory of a round's work so far: (\d+) MB", (tmp_path / "client0.log").read_text())
    assert peaks and int(peaks[-1]) > 100, (tmp_path / "client0.log").read_text()[-2000:]


def second_user(argv: list[str], home: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    """``argv`` as another local account of this machine: uid/gid 65534, no groups, no capability but
    CAP_DAC_READ_SEARCH (so it can load this interpreter from a root-only home folder; it can read
    any file, which a real second user cannot, and has no network capability, which it would not)."""
    return subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all,+dac_read_search",
            "--ambient-caps=+dac_read_search",
            *argv,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "FLWR_HOME": str(home), "HOME": str(home)},
    )


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv"), reason="a second local account needs root (setpriv) to be made"
)
def test_a_second_local_user_cannot_drive_the_superlink_and_the_operator_can(tmp_path, creds):
    from fedlora.deploy.processes import free_port

    port = free_port()
    config = server_config(tmp_path, creds, port, rounds=1)
    server = cli("server", "-c", str(config), log=tmp_path / "server.log")
    try:
        wait_for(
            lambda: (
                "run 1 submitted" in (tmp_path / "server.log").read_text()
                or re.search(r"run \d+ submitted", (tmp_path / "server.log").read_text())
            ),
            90,
            "the run",
            [tmp_path / "server.log"],
        )
        run = run_dir_of(tmp_path)
        control_port = __import__("tomllib").loads(config.read_text())["server"]["control_port"]
        # The other account's Flower home, pointed at the SuperLink's loopback port and at the devices'.
        # Outside pytest's own 0700 folder: the other account's files are its own (Flower checks access()).
        home = Path(tempfile.mkdtemp(prefix="fedlora-other-user-"))
        home.chmod(0o755)
        shutil.copy(creds.ca_cert, home / "ca.crt")
        shutil.copy(creds.nodes[3].public_key, home / "mine.pub")  # a key of the other account's own
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "link"\n[superlink.link]\naddress = "127.0.0.1:{control_port}"\n'
            f'root-certificates = "{home / "ca.crt"}"\n[superlink.door]\naddress = "127.0.0.1:{port}"\n'
            f'root-certificates = "{home / "ca.crt"}"\n'
        )
        app = home / "outsider-app"
        app.mkdir()
        (app / "pyproject.toml").write_text(OUTSIDER_APP)
        (app / "x.py").write_text("app = None\n")
        for p in (home, app, *home.iterdir(), *app.iterdir()):
            os.chown(p, 65534, 65534)
        flwr = str(Path(sys.executable).parent / "flwr")
        tries = {
            (what, conn): second_user([flwr, *args, conn], home)
            for what, args in [
                ("list runs", ["ls"]),
                ("list nodes", ["supernode", "ls"]),
                ("register a key", ["supernode", "register", str(home / "mine.pub")]),
                ("submit an app", ["run", str(app)]),
            ]
            for conn in ("link", "door")
        }
        # A device whose key is not enrolled tries three times; its resident executor (imports, model)
        # is started once, not once per try.
        unenrolled = tmp_path / "unenrolled.toml"
        unenrolled.write_text(
            f'server = "127.0.0.1:{port}"\nroot_certificates = "{creds.ca_cert}"\n'
            f'node_key = "{creds.nodes[3].private_key}"\npartition_id = 0\nmax_retries = 2\n'
            f'enrol_retry = 1\nstate_dir = "{tmp_path / "state-unenrolled"}"\n'
        )
        device = cli("client", "--settings", str(unenrolled), log=tmp_path / "unenrolled.log")
        assert device.wait(120) == 1, (tmp_path / "unenrolled.log").read_text()
        # The operator, from a shell of its own, through the run directory.
        operator = subprocess.run(
            [sys.executable, "-m", "fedlora.cli", "control", str(run), "--", flwr, "ls", "fedlora", "--format", "json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        operator_nodes = subprocess.run(
            [
                sys.executable,
                "-m",
                "fedlora.cli",
                "control",
                str(run),
                "--",
                flwr,
                "supernode",
                "ls",
                "fedlora",
                "--format",
                "json",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        kill_group(server, signal.SIGTERM)
        shutil.rmtree(home, ignore_errors=True)
    out = (tmp_path / "server.log").read_text()
    assert "the SuperLink runs in a private network" in out, out
    for (what, conn), res in tries.items():
        text = res.stdout + res.stderr
        assert res.returncode != 0, (what, conn, text)
        if conn == "link":  # nothing listens on this machine's loopback at the SuperLink's port
            assert "refused" in text.lower() or "connect" in text.lower(), (what, text[-1500:])
        else:  # the devices' address answers Fleet API calls only
            assert "403" in text or "devices only" in text, (what, text[-1500:])
    assert operator.returncode == 0, operator.stdout + operator.stderr
    runs = json.loads(operator.stdout[operator.stdout.index("{") :])["runs"]
    assert len(runs) == 1, operator.stdout
    # The SuperLink knows the three keys fedlora enrolled, and none of the other account's.
    nodes = json.loads(operator_nodes.stdout[operator_nodes.stdout.index("{") :])["nodes"]
    assert len(nodes) == 3 and {n["status"] for n in nodes} == {"registered"}, operator_nodes.stdout
    # The run directory (the SuperLink's database, its logs, the operator's connection) is the server's alone.
    assert run.stat().st_mode & 0o077 == 0, oct(run.stat().st_mode)
    console = (tmp_path / "unenrolled.log").read_text()
    assert console.count("the server does not know this node's key") == 1, console
    node_log = (tmp_path / "state-unenrolled" / "supernode.log").read_text()
    assert node_log.count("Failed to activate SuperNode") == 3, node_log[-2000:]
    executor_log = (tmp_path / "state-unenrolled" / "executor.log").read_text()
    assert executor_log.count("resident executor up, process") == 1, executor_log


def test_server_puts_only_the_fleet_api_on_its_address_and_refuses_tls_without_enrolled_keys(tmp_path):
    from fedlora.config import ConfigError
    from fedlora.deploy.prechecks import security

    cfg = make_config(tmp_path)
    cfg.server.address = "0.0.0.0:9092"
    # The devices' address gets fedlora's gate; the SuperLink (and its Control API) stays on loopback.
    assert cfg.server.superlink_host_port() == ("127.0.0.1", 9093)
    cfg.server.control_port = 9200
    assert cfg.server.superlink_host_port() == ("127.0.0.1", 9200)
    cfg.server.expose_control_api = True  # knowingly: the SuperLink itself on the public address
    assert cfg.server.superlink_host_port() == ("0.0.0.0", 9092)
    with pytest.raises(ConfigError, match="TLS is on by default"):
        security(cfg, insecure_flag=False)
    assert security(cfg, insecure_flag=True) == (False, False)  # only when asked, explicitly
    cfg.server.tls_certfile = cfg.server.tls_keyfile = cfg.server.tls_ca_certfile = str(SHARED_DATA / "index.json")
    with pytest.raises(ConfigError, match="enrolled_keys names no public key"):
        security(cfg, insecure_flag=False)


def test_server_refuses_a_certificate_the_gate_cannot_check_on_loopback(tmp_path):
    from fedlora.config import ConfigError
    from fedlora.deploy.pki import create_credentials
    from fedlora.deploy.prechecks import covers_loopback, security

    creds = create_credentials(tmp_path / "creds", ["fl.example.org"], nodes=1)
    assert covers_loopback(creds.server_cert)  # `fedlora certs` always names 127.0.0.1 for the gate
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fl.example.org")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("fl.example.org")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    from cryptography.hazmat.primitives.serialization import Encoding

    (tmp_path / "public-only.crt").write_bytes(cert.public_bytes(Encoding.PEM))
    cfg = make_config(tmp_path)
    cfg.server.tls_certfile = str(tmp_path / "public-only.crt")
    cfg.server.tls_keyfile, cfg.server.tls_ca_certfile = str(creds.server_key), str(creds.ca_cert)
    cfg.server.enrolled_keys = [str(creds.nodes[0].public_key)]
    with pytest.raises(ConfigError, match="not valid for 127.0.0.1"):
        security(cfg, insecure_flag=False)
    cfg.server.expose_control_api = True  # no gate, no loopback hop
    assert security(cfg, insecure_flag=False) == (True, True)


def test_server_prechecks_fail_before_the_superlink_starts(tmp_path):
    from fedlora.config import ConfigError
    from fedlora.deploy.server import serve
    from fedlora.rundir import RunDir

    cfg = make_config(tmp_path, data={"dataset": str(tmp_path / "no-such-folder")})
    run_dir = RunDir.create(cfg)
    with pytest.raises(ConfigError, match="'data.dataset'.*does not exist on this machine"):
        serve(cfg, run_dir, insecure=True)
    assert not (run_dir.path / "superlink.log").exists()  # nothing was started
    ok = make_config(tmp_path)
    done = RunDir.create(ok)
    (done.path / "summary.json").write_text("{}")
    with pytest.raises(ConfigError, match="finished its 2 rounds already"):
        serve(ok, done, resume=True, insecure=True)
    assert not (done.path / "superlink.log").exists()


def test_client_settings_fail_with_a_sentence(tmp_path):
    from fedlora.config import ConfigError
    from fedlora.deploy.client import ClientSettings

    with pytest.raises(ConfigError, match="host:port"):
        ClientSettings.load(None, {"server": "nohost", "insecure": True, "partition_id": 0})
    with pytest.raises(ConfigError, match="root_certificates"):
        ClientSettings.load(None, {"server": "h:1", "partition_id": 0})
    with pytest.raises(ConfigError, match="data"):
        ClientSettings.load(None, {"server": "h:1", "insecure": True})
    bad = tmp_path / "c.toml"
    bad.write_text('server = "h:1"\nrnak = 4\n')
    with pytest.raises(ConfigError, match="unknown client setting 'rnak'"):
        ClientSettings.load(bad, {})
    with pytest.raises(ConfigError, match="threads must be >= 0"):
        ClientSettings.load(None, {"server": "h:1", "insecure": True, "partition_id": 0, "threads": -1})
    # A device's data folder without a training file: said before connecting, naming the flag.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "test.jsonl").write_text('{"text": "a", "label": "x"}\n')
    with pytest.raises(ConfigError, match=r"--data .*mine: no train.jsonl .* it has test.jsonl"):
        ClientSettings.load(None, {"server": "h:1", "insecure": True, "data": str(tmp_path / "mine")})
    # A folder with a training file only is a device's data (a test split is carved out of it).
    (tmp_path / "train-only").mkdir()
    (tmp_path / "train-only" / "train.jsonl").write_text('{"text": "a", "label": "x"}\n')
    assert ClientSettings.load(None, {"server": "h:1", "insecure": True, "data": str(tmp_path / "train-only")}).data
    with pytest.raises(ConfigError, match=r"--data .*nowhere: does not exist"):
        ClientSettings.load(None, {"server": "h:1", "insecure": True, "data": str(tmp_path / "nowhere")})


def test_a_refused_activation_is_told_apart_a_stale_session_from_an_unknown_key(tmp_path):
    """Flower refuses activation with the same words to a key it does not know and to a node restarted
    while its previous session still counts as online: a node that joined this server before is told
    it waits for the old session to lapse; one that never joined is told to get its key enrolled."""
    from fedlora.deploy.client import ClientSettings, ConsoleNotes
    from fedlora.deploy.pki import create_credentials

    creds = create_credentials(tmp_path / "creds", [], nodes=1)
    refused = (
        "ERROR :     Exit Code: 305\nFailed to initialize the connection to the SuperLink.\n"
        "[code: 2004] Failed to activate SuperNode.\n"
    )
    said: list[str] = []
    s = ClientSettings.load(
        None,
        {
            "server": "10.0.0.5:9092",
            "root_certificates": str(creds.ca_cert),
            "node_key": str(creds.nodes[0].private_key),
            "partition_id": 0,
            "state_dir": str(tmp_path / "state"),
        },
    )
    (tmp_path / "state").mkdir()
    notes = ConsoleNotes(s, said.append)
    assert notes.exited("INFO : Starting Flower SuperNode\n") is None
    assert notes.exited(refused) == 30.0 and notes.exited(refused) == 30.0
    assert len(said) == 1 and said[0].startswith("the server does not know this node's key: ask the operator to enrol")
    notes.read("INFO : Connection successful after 0.50 seconds and 1 tries.\n")
    assert said[-1] == "connected to the server at 10.0.0.5:9092"
    again = ConsoleNotes(s, said.append)  # the client restarted with the same state folder
    assert again.exited(refused) == 5.0
    assert "previous session as online" in said[-1] and "60 s" in said[-1]


def test_the_devices_console_says_connected_at_once_then_how_long_the_server_was_away(tmp_path):
    """From a SuperNode's log as Flower writes it: the first join (Flower logs a success only after a
    failed try, so its node id is the sign), then the server unreachable for longer than connect_wait
    (said once, with the seconds that really passed), then the rejoin with how long it took."""
    from fedlora.deploy.client import ClientSettings, ConsoleNotes

    said: list[str] = []
    s = ClientSettings.load(
        None,
        {
            "server": "10.0.0.5:9092",
            "insecure": True,
            "partition_id": 0,
            "state_dir": str(tmp_path / "state"),
            "connect_wait": 1.0,
        },
    )
    (tmp_path / "state").mkdir()
    notes = ConsoleNotes(s, said.append)
    log = "INFO :      Starting Flower SuperNode\nINFO :      SuperNode ID: 123\n"
    notes.read(log)
    assert said == ["connected to the server at 10.0.0.5:9092"]
    log += "WARNING :   Connection attempt failed, retrying in 1.00 seconds\n"
    notes.read(log)
    assert len(said) == 1  # not yet connect_wait
    time.sleep(1.2)
    log += "WARNING :   Connection attempt failed, retrying in 2.00 seconds\n"
    notes.read(log)
    log += "WARNING :   Connection attempt failed, retrying in 4.00 seconds\n"
    notes.read(log)
    assert len(said) == 2 and re.fullmatch(
        r"cannot reach the server at 10.0.0.5:9092 for 1 s: .* \(still trying\)", said[1]
    ), said
    time.sleep(1.0)
    notes.read(log + "INFO :      Connection successful after 1.20 seconds and 3 tries.\n")
    assert len(said) == 3 and re.fullmatch(r"rejoined the server at 10.0.0.5:9092 after 2 s", said[2]), said


def test_a_client_whose_server_is_unreachable_says_so_once_with_the_address(tmp_path):
    """A real SuperNode pointed at a port nobody serves: after connect_wait seconds the device's console
    says which address it tried, once, and the client keeps trying."""
    from fedlora.deploy.processes import free_port

    port = free_port()
    settings = tmp_path / "c.toml"
    settings.write_text(
        f'server = "127.0.0.1:{port}"\ninsecure = true\npartition_id = 0\nconnect_wait = 2.0\n'
        f'state_dir = "{tmp_path / "state"}"\n'
    )
    client = cli("client", "--settings", str(settings), "--cold", log=tmp_path / "client.log")
    sentence = re.compile(rf"cannot reach the server at 127.0.0.1:{port} for (\d+) s")
    try:
        found = wait_for(
            lambda: sentence.search((tmp_path / "client.log").read_text()),
            60,
            "the unreachable sentence",
            [tmp_path / "client.log", tmp_path / "state" / "supernode.log"],
        )
        assert int(found.group(1)) >= 2  # the time that passed, not the setting
        time.sleep(4)
        assert client.poll() is None  # still trying
    finally:
        kill_group(client, signal.SIGTERM)
    assert (tmp_path / "client.log").read_text().count("cannot reach the server") == 1


def test_a_device_sizes_its_own_threads_and_keeps_its_files_in_its_own_folder(tmp_path, shared_data):
    """Device-side settings: the thread count a device sets wins over the run config's, and its personal
    adapter is written inside the state folder its owner gave, not next to it."""
    from fedlora.clients.session import ClientSession
    from fedlora.deploy.client import ClientSettings

    s = ClientSettings.load(
        None,
        {
            "server": "h:1",
            "insecure": True,
            "data": str(shared_data / "agnews"),
            "state_dir": str(tmp_path / "state"),
            "threads": 1,
        },
    )
    nc = dict(x.split("=", 1) for x in s.node_config().split(" "))
    assert nc["threads"] == "1" and nc["state-dir"].strip('"') == str((tmp_path / "state").resolve())
    cfg = make_config(tmp_path, train={"num_threads": 2})
    node_config = {"threads": 1, "state-dir": str(tmp_path / "state"), "partition-id": 0}
    before = torch.get_num_threads()
    torch.set_num_threads(3)  # neither setting: what the session must change
    try:
        session = ClientSession.from_parts(cfg, node_config, node_id=7)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    from fedlora.model import AdapterSpec, build_peft_model

    model = build_peft_model(cfg, 4, AdapterSpec.for_rank(cfg, session.profile.rank))
    where = Path(session.save_personal_adapter(model)).resolve()
    assert where.is_relative_to((tmp_path / "state").resolve()), where


def test_the_servers_run_config_cannot_choose_paths_on_a_device(tmp_path):
    """model.cache_dir and a local model.name are the device owner's to choose: the server's cache
    folder is never created, and a base model folder loads only from a folder the owner allowed."""
    from fedlora.clients.session import ClientSession, device_view
    from fedlora.config import ConfigError

    cfg = make_config(tmp_path)
    cfg.model.cache_dir = str(tmp_path / "server-chosen-cache")
    mine = {"state-dir": str(tmp_path / "state"), "partition-id": 0, "cache-dir": str(tmp_path / "my-cache")}
    session = ClientSession.from_parts(cfg, mine, node_id=3)
    assert session.cfg.model.cache_dir == str(tmp_path / "my-cache")
    assert not (tmp_path / "server-chosen-cache").exists()
    assert cfg.model.cache_dir == str(tmp_path / "server-chosen-cache")  # the run's own config is untouched
    # A base model named by a folder on the device: refused unless the owner allowed a folder above it.
    (tmp_path / "models" / "secret").mkdir(parents=True)
    cfg.model.name = str(tmp_path / "models" / "secret")
    with pytest.raises(ConfigError, match=r"has not allowed: start fedlora client with --model-dir .*models"):
        ClientSession.from_parts(cfg, mine, node_id=3)
    assert device_view(cfg, {**mine, "model-dirs": str(tmp_path / "models")}).model.name == cfg.model.name
    with pytest.raises(ConfigError, match="has not allowed"):
        device_view(cfg, {**mine, "model-dirs": str(tmp_path / "other")})
    # A simulation's virtual clients (no state-dir of their own) keep the run's settings.
    assert (
        ClientSession.from_parts(make_config(tmp_path), {"partition-id": 0}, node_id=4).cfg.model.cache_dir
        == make_config(tmp_path).model.cache_dir
    )


def test_a_device_whose_labels_are_not_the_runs_is_named_by_client_id_and_its_flag(tmp_path, caplog):
    """The setup handler, called as Flower calls it: the error the server reads names the client and the
    device's own flag (--data, not the run's data.dataset), and the device's log says the same."""
    import json as _json

    from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

    from fedlora.clients import app as client_app
    from fedlora.protocol import CONFIG, SETUP

    mine = tmp_path / "mine"
    mine.mkdir()
    for split in ("train", "test"):
        (mine / f"{split}.jsonl").write_text(
            "".join(_json.dumps({"text": f"row {i}", "label": "Cooking"}) + "\n" for i in range(4))
        )
    cfg = make_config(tmp_path)
    ctx = Context(
        run_id=1,
        node_id=11,
        node_config={"data": str(mine), "client-id": "kitchen-07", "state-dir": str(tmp_path / "state")},
        state=RecordDict(),
        run_config={},
    )
    content = RecordDict(
        {
            CONFIG: ConfigRecord(
                {
                    "action": SETUP,
                    "run-config": cfg.to_json(),
                    "label-names": _json.dumps(["World", "Sports", "Business", "Sci/Tech"]),
                }
            )
        }
    )
    msg = Message(
        content=content,
        metadata=Metadata(
            run_id=1,
            message_id="m",
            src_node_id=0,
            dst_node_id=11,
            reply_to_message_id="",
            group_id="",
            created_at=time.time(),
            ttl=60.0,
            message_type=MessageType.QUERY,
        ),
    )
    with caplog.at_level("ERROR", logger="fedlora.client"), pytest.raises(RuntimeError) as err:
        client_app.setup(msg, ctx)
    text = str(err.value)
    assert text.startswith("client kitchen-07: --data ") and "'Cooking' is not among" in text, text
    assert "data.dataset" not in text
    assert any(r.getMessage().startswith(f"--data {mine}") for r in caplog.records)


def test_resident_executor_tasks_run_parallel_torch_after_the_parent_loaded_a_model(tmp_path):
    """A forked task must not inherit a dead OpenMP pool (it would wait forever in its first
    parallel op, as it did with MiniLM before the executor kept its own work single-threaded)."""
    code = """
import os, sys, torch
torch.set_num_threads(2)
from fedlora.deploy.executor import fork_task, single_threaded_parent
threads = single_threaded_parent()
x = torch.randn(2000, 2000)
(x @ x).sum()                      # the parent's own work: loading and copying weights
pid = fork_task(lambda: print(float((torch.randn(2000, 2000) @ x).sum()) != 0, torch.get_num_threads()), threads)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["True", "2"]


def test_the_executor_keeps_a_cuda_run_out_of_its_forks(tmp_path, monkeypatch):
    """A run set up to train on CUDA is served by a spawned worker (auto mode), read from the setup
    file alone; a CPU run keeps the forks of the warm executor."""
    import torch

    from fedlora.clients.session import SETUP_FILE
    from fedlora.deploy.executor import setup_trains_on_cuda

    assert not setup_trains_on_cuda(tmp_path)  # no run set up yet: the setup task is forked

    def set_up(device: str) -> None:
        (tmp_path / SETUP_FILE).write_text(json.dumps({"run-config": json.dumps({"train": {"device": device}})}))

    for device, expect in [("cuda", True), ("cuda:1", True), ("cpu", False), ("mps", False)]:
        set_up(device)
        assert setup_trains_on_cuda(tmp_path) is expect, device
    set_up("auto")
    assert setup_trains_on_cuda(tmp_path) is torch.cuda.is_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with a GPU, as auto sees it
    assert setup_trains_on_cuda(tmp_path) is True


def test_a_new_runs_task_ends_the_tasks_still_serving_a_stopped_run():
    """fedlora server runs one run at a time, so a task of another run is a stopped run's: the
    executor ends it (SIGTERM) when the new run's first task arrives, once, and leaves the new run's."""
    code = """
import os, signal, sys, time
from fedlora.deploy.executor import TaskProcesses, fork_task
tasks = TaskProcesses()
stale, current = fork_task(lambda: time.sleep(60), 1), fork_task(lambda: time.sleep(60), 1)
tasks.add(stale, 111)
tasks.add(current, 222)
print(tasks.end_other_runs(222) == [(stale, 111)], tasks.end_other_runs(222) == [])
_, status = os.waitpid(stale, 0)
print(os.waitstatus_to_exitcode(status) == -signal.SIGTERM, os.waitpid(current, os.WNOHANG) == (0, 0))
tasks.stop_all()
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["True"] * 4, res.stdout


def test_flwr_run_config_paths_resolve_in_the_installed_app_or_fail_with_the_fix(tmp_path, monkeypatch):
    from fedlora.server.app import resolve_app_path

    home = tmp_path / "flwr-home"
    app = home / "apps" / "fedlora.fedlora.0.1.0.abcd"
    (app / "simulations").mkdir(parents=True)
    (app / "simulations" / "x.toml").write_text("[run]\nrounds = 1\n")
    monkeypatch.setenv("FLWR_HOME", str(home))
    monkeypatch.chdir(tmp_path)  # where a SuperLink happened to start: no simulations/ here
    assert resolve_app_path("simulations/x.toml") == app / "simulations" / "x.toml"
    (tmp_path / "simulations").mkdir()
    (tmp_path / "simulations" / "x.toml").write_text("")
    assert resolve_app_path("simulations/x.toml") == Path("simulations/x.toml")  # the working folder first
    with pytest.raises(FileNotFoundError, match=r"pass an absolute path"):
        resolve_app_path("simulations/missing.toml")
