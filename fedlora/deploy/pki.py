"""A test CA, a server certificate and node keys for a local trial (`fedlora certs`).

Flower's SuperLink serves TLS with a certificate signed by a CA the SuperNodes trust
(``--root-certificates``); node authentication uses one EC P-384 key pair per node: the private
key stays on the device (OpenSSH PEM), the public key is enrolled on the SuperLink (OpenSSH format, what
``flwr supernode register`` reads). For production, use your organisation's CA.
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


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o600)


def node_key_pair(folder: Path, name: str) -> NodeKey:
    """One node's EC P-384 key pair: ``<name>.key`` (private, PEM) and ``<name>.pub`` (OpenSSH)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    priv, pub = folder / f"{name}.key", folder / f"{name}.pub"
    # OpenSSH formats on both sides: what flower-supernode and `flwr supernode register` read.
    _write_private(priv, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                  serialization.PublicFormat.OpenSSH))
    return NodeKey(name=name, private_key=priv, public_key=pub)


def create_credentials(folder: str | Path, hosts: list[str], nodes: int, days: int = 30) -> Credentials:
    """A CA, a server certificate valid for ``hosts`` (names or IP addresses) and ``nodes`` node keys."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlora test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA384()))

    names: list[x509.GeneralName] = []
    for h in dict.fromkeys(hosts or ["127.0.0.1", "localhost"]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(hosts[0] if hosts else "localhost"))]))
              .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(start).not_valid_after(end)
              .add_extension(x509.SubjectAlternativeName(names), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .sign(ca_key, hashes.SHA384()))

    pem = serialization.Encoding.PEM
    ca_cert, server_cert, server_key_path = folder / "ca.crt", folder / "server.crt", folder / "server.key"
    ca_cert.write_bytes(ca.public_bytes(pem))
    server_cert.write_bytes(server.public_bytes(pem))
    _write_private(server_key_path, server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))
    # The CA's key is not kept: this CA signs one server certificate and is then done.
    keys = tuple(node_key_pair(folder / "nodes", f"node-{i}") for i in range(nodes))
    return Credentials(folder=folder, ca_cert=ca_cert, server_cert=server_cert, server_key=server_key_path, nodes=keys)
