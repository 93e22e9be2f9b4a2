"""The ``[server]`` section: what `fedlora server` starts (the gate on the devices' address, the
SuperLink on loopback), its TLS files and the node keys it enrols."""

from __future__ import annotations

from dataclasses import dataclass

from fedlora.schema import _meta, _require


@dataclass
class ServerSection:
    """`fedlora server`: the SuperLink it starts (Flower's deployment runtime)."""

    address: str = _meta(
        "host:port the devices connect to (Flower's Fleet API only, through fedlora's gate); "
        "0.0.0.0 listens on every interface.",
        default="127.0.0.1:9092",
    )
    control_port: int = _meta(
        "Port of the SuperLink itself, on 127.0.0.1 only: its Control API (runs, node keys, "
        "app submission) is there, for the operator (0 = server.address's port + 1).",
        default=0,
    )
    tls_certfile: str = _meta("Server certificate (PEM); `fedlora certs` makes a test one.", default="")
    tls_keyfile: str = _meta("Server private key (PEM).", default="")
    tls_ca_certfile: str = _meta("CA certificate that signed the server certificate (PEM).", default="")
    insecure: bool = _meta(
        "Serve without TLS (and without node authentication). Refused on a non-loopback address unless set explicitly.",
        default=False,
    )
    node_auth: bool = _meta(
        "Only nodes whose public key is enrolled join (Flower's SuperNode authentication; needs TLS).", default=True
    )
    enrolled_keys: list[str] = _meta(
        "Public keys (OpenSSH, EC P-384) of the nodes allowed to join; a folder means every *.pub in it.",
        default_factory=list,
    )
    expose_control_api: bool = _meta(
        "Serve the SuperLink itself on server.address, without the gate: flwr 1.42 serves its Control API (runs, "
        "node keys, app submission) on the devices' port, unauthenticated in the open-source distribution, so "
        "anyone who reaches the port with ca.crt could enrol a node or submit code. Set it only knowingly.",
        default=False,
    )
    private_network: bool = _meta(
        "Run the SuperLink (and every process `fedlora server` starts) in a private Linux network namespace, so "
        "no other account on this machine can reach its Control API; the devices' address is bound before, "
        "outside it. Where the kernel refuses one, the server says so at start and listens on the machine's "
        "loopback. `fedlora control RUN_DIR -- flwr ...` reaches the SuperLink from the operator's shell.",
        default=True,
    )
    database: str = _meta(
        "SuperLink state (SQLite); '' = <run dir>/superlink.db, so a restarted SuperLink "
        "keeps its nodes, messages and runs.",
        default="",
    )

    def validate(self) -> None:
        host, _, port = self.address.rpartition(":")
        _require(
            bool(host) and port.isdigit() and 0 < int(port) < 65536,
            "server.address",
            f"must be host:port, got {self.address!r}",
        )
        tls = [bool(self.tls_certfile), bool(self.tls_keyfile), bool(self.tls_ca_certfile)]
        _require(
            all(tls) or not any(tls),
            "server.tls_*",
            "give all of tls_certfile, tls_keyfile and tls_ca_certfile, or none",
        )
        _require(not (self.insecure and any(tls)), "server.insecure", "contradicts the TLS files given")
        _require(0 <= self.control_port < 65536, "server.control_port", "must be a port number (0 = address's + 1)")
        _require(
            self.expose_control_api or self.control_port != int(port) or not self.is_loopback(),
            "server.control_port",
            f"must differ from server.address's port {port}",
        )

    def superlink_host_port(self) -> tuple[str, int]:
        """Where the SuperLink itself listens: server.address when its Control API is exposed knowingly,
        else 127.0.0.1 (behind the gate on server.address)."""
        if self.expose_control_api:
            return self.host_port()
        port = self.control_port or self.host_port()[1] + 1
        return "127.0.0.1", port

    def host_port(self) -> tuple[str, int]:
        host, _, port = self.address.rpartition(":")
        return host.strip("[]"), int(port)

    def is_loopback(self) -> bool:
        import ipaddress

        host = self.host_port()[0]
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False
