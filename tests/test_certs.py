"""`fedlora certs`: private keys 0600 from creation and never in the folder the server enrols;
nothing existing overwritten without --force; `certs add-node` adds one node."""

from __future__ import annotations

import stat
import subprocess
import sys

import pytest


def _mode(p) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _certs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedlora.cli", "certs", *args], capture_output=True, text=True)


def test_keys_are_private_from_creation_and_apart_from_what_the_server_enrols(tmp_path):
    from fedlora.deploy.pki import create_credentials

    c = create_credentials(tmp_path / "creds", ["127.0.0.1"], nodes=2)
    assert _mode(c.server_key) == 0o600
    for n in c.nodes:
        assert _mode(n.private_key) == 0o600 and n.private_key.parent.name == "devices"
        assert n.public_key.parent == tmp_path / "creds" / "enrol"
    enrolled = sorted(p.name for p in (tmp_path / "creds" / "enrol").iterdir())
    assert enrolled == ["node-0.pub", "node-1.pub"]  # public keys only
    assert all(b"PRIVATE" not in p.read_bytes() for p in (tmp_path / "creds" / "enrol").iterdir())


def test_existing_credentials_are_never_overwritten_without_force(tmp_path):
    from fedlora.deploy.pki import CredentialsExist, create_credentials

    c = create_credentials(tmp_path / "creds", ["127.0.0.1"], nodes=1)
    ca, key = c.ca_cert.read_bytes(), c.nodes[0].private_key.read_bytes()
    with pytest.raises(CredentialsExist, match="refusing to overwrite"):
        create_credentials(tmp_path / "creds", ["127.0.0.1"], nodes=1)
    assert c.ca_cert.read_bytes() == ca and c.nodes[0].private_key.read_bytes() == key
    again = create_credentials(tmp_path / "creds", ["127.0.0.1"], nodes=1, force=True)
    assert again.ca_cert.read_bytes() != ca and _mode(again.nodes[0].private_key) == 0o600


def test_the_cli_refuses_a_second_create_and_adds_one_node(tmp_path):
    folder = tmp_path / "creds"
    first = _certs(str(folder), "--nodes", "2")
    assert first.returncode == 0, first.stderr
    ca = (folder / "ca.crt").read_bytes()
    again = _certs(str(folder))
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr and "--force" in again.stderr
    assert (folder / "ca.crt").read_bytes() == ca
    added = _certs("add-node", str(folder))
    assert added.returncode == 0, added.stderr
    assert (folder / "enrol" / "node-2.pub").exists() and _mode(folder / "devices" / "node-2.key") == 0o600
    assert _certs("add-node", str(folder), "--name", "node-2").returncode == 2  # no silent replacement
    assert (folder / "ca.crt").read_bytes() == ca
