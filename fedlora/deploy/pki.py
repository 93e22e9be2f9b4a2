"""A test CA, a server certificate and node keys for a local trial (`fedlora certs`).

Flower's SuperLink serves TLS with a certificate signed by a CA the SuperNodes trust
(``--root-certificates``); node authentication uses one EC P-384 key pair per node: the private
key stays on the device (OpenSSH PEM), the public key is enrolled on the SuperLink (OpenSSH format, what
``flwr supernode register`` reads). For production, use your organisation's CA.

Layout of a credentials folder: ``ca.crt``, ``server.crt``, ``server.key`` (the server's),
``enrol/node-N.pub`` (the folder the server enrols: public keys only) and
``devices/node-N.key`` (each private key, to be copied to its one device and deleted here).
Private keys are created with mode 0600 (never world-readable, not even for an instant), and
nothing existing is overwritten unless asked (``force``): a second ``fedlora certs`` on the same
folder would otherwise replace the CA every enrolled device trusts.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class NodeKey:
    name: str
    private_key: Path  # OpenSSH PEM, for `fedlora client --node-key`
    public_key: Path  # OpenSSH, enrolled on the server


@dataclass(frozen=True)
class Credentials:
    folder: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    nodes: tuple[NodeKey, ...]


ENROL_DIR, DEVICES_DIR = "enrol", "devices"


class CredentialsExist(FileExistsError):
    """A file ``fedlora certs`` would write exists already (pass ``force`` to replace it)."""


def _write(path: Path, data: bytes, mode: int, force: bool) -> None:
    """Write ``data`` to a new file created with ``mode`` (so a private key is 0600 from its first
    byte); an existing file is an error unless ``force``, and then it is replaced atomically."""
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not force:
        raise CredentialsExist(
            f"{path} exists; refusing to overwrite it (pass --force to replace it, and with it "
            "what every device trusts or holds)"
        )
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def node_key_pair(folder: Path, name: str, force: bool = False) -> NodeKey:
    """One node's EC P-384 key pair: ``devices/<name>.key`` (private, PEM, 0600) and
    ``enrol/<name>.pub`` (OpenSSH) under ``folder``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"node name {name!r} must be a plain file name")
    priv, pub = folder / DEVICES_DIR / f"{name}.key", folder / ENROL_DIR / f"{name}.pub"
    for p in (priv, pub):
        if p.exists() and not force:
            raise CredentialsExist(f"{p} exists; refusing to overwrite it (pass --force, or choose another name)")
    key = ec.generate_private_key(ec.SECP384R1())
    # OpenSSH formats on both sides: what flower-supernode and `flwr supernode register` read.
    _write(
        priv,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
        0o600,
        force,
    )
    _write(
        pub,
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH),
        0o644,
        force,
    )
    return NodeKey(name=name, private_key=priv, public_key=pub)


def create_credentials(
    folder: str | Path, hosts: list[str], nodes: int, days: int = 30, force: bool = False
) -> Credentials:
    """A CA, a server certificate valid for ``hosts`` (names or IP addresses) and ``nodes`` node keys.
    Refuses (:class:`CredentialsExist`, before writing anything) if any of them exists, unless ``force``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder = Path(folder)
    planned = [folder / n for n in ("ca.crt", "server.crt", "server.key")] + [
        folder / d / f"node-{i}.{ext}" for i in range(nodes) for d, ext in ((DEVICES_DIR, "key"), (ENROL_DIR, "pub"))
    ]
    existing = [p for p in planned if p.exists()]
    if existing and not force:
        raise CredentialsExist(
            f"{existing[0]} exists ({len(existing)} of the files to write do); refusing to "
            "overwrite them: a new CA would lock out every device that trusts the old one. Pass "
            "--force to replace them, or `fedlora certs add-node` to add a node"
        )
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlora test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA384())
    )

    names: list[x509.GeneralName] = []
    # 127.0.0.1 always: fedlora's gate reaches the SuperLink there and checks this certificate.
    for h in dict.fromkeys([*(hosts or []), "127.0.0.1", "localhost"]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(hosts[0] if hosts else "localhost"))]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    pem = serialization.Encoding.PEM
    ca_cert, server_cert, server_key_path = folder / "ca.crt", folder / "server.crt", folder / "server.key"
    _write(
        server_key_path,
        server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        0o600,
        force,
    )
    _write(server_cert, server.public_bytes(pem), 0o644, force)
    _write(ca_cert, ca.public_bytes(pem), 0o644, force)
    # The CA's key is not kept: this CA signs one server certificate and is then done.
    keys = tuple(node_key_pair(folder, f"node-{i}", force) for i in range(nodes))
    return Credentials(folder=folder, ca_cert=ca_cert, server_cert=server_cert, server_key=server_key_path, nodes=keys)
