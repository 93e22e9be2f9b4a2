"""What `fedlora server` checks before it starts a process: TLS and node authentication, the
enrolled keys, paths made absolute for the ServerApp's process, and what can be refused without a
client. Each refusal is a ConfigError that says what to do."""

from __future__ import annotations

from pathlib import Path

from fedlora.config import ConfigError, FedLoraConfig
from fedlora.privacy.accounting import check_client_targets
from fedlora.rundir import RunDir


def security(cfg: FedLoraConfig, insecure_flag: bool) -> tuple[bool, bool]:
    """(TLS on, node authentication on), or a ConfigError that says what to do."""
    s = cfg.server
    insecure = s.insecure or insecure_flag
    if insecure:
        return False, False
    if not s.tls_certfile:
        raise ConfigError(
            "TLS is on by default: set server.tls_certfile, tls_keyfile and tls_ca_certfile "
            "(`fedlora certs` makes test ones), or pass --insecure for a trial without TLS and "
            "without node authentication"
        )
    for key in ("tls_certfile", "tls_keyfile", "tls_ca_certfile"):
        if not Path(getattr(s, key)).expanduser().exists():
            raise ConfigError(f"server.{key}: {getattr(s, key)} does not exist")
    if not s.expose_control_api and not covers_loopback(Path(s.tls_certfile).expanduser()):
        raise ConfigError(
            f"server.tls_certfile {s.tls_certfile} is not valid for 127.0.0.1, where the SuperLink "
            "listens behind fedlora's gate (the gate checks the SuperLink's certificate): add IP "
            "127.0.0.1 to its subject alternative names (`fedlora certs` does)"
        )
    if s.node_auth and not enrolled_keys(cfg):
        raise ConfigError(
            "server.node_auth is on but server.enrolled_keys names no public key: no client could "
            "join (enrol the nodes' .pub files, or set server.node_auth=false)"
        )
    return True, s.node_auth


def covers_loopback(certfile: Path) -> bool:
    """Whether a PEM certificate names IP 127.0.0.1 among its subject alternative names."""
    import ipaddress

    from cryptography import x509

    cert = x509.load_pem_x509_certificate(certfile.read_bytes())
    try:
        ips = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.IPAddress
        )
    except x509.ExtensionNotFound:
        return False
    return ipaddress.ip_address("127.0.0.1") in ips


def enrolled_keys(cfg: FedLoraConfig) -> list[Path]:
    out: list[Path] = []
    for item in cfg.server.enrolled_keys:
        p = Path(item).expanduser()
        if p.is_dir():
            out.extend(sorted(p.glob("*.pub")))
        elif p.exists():
            out.append(p)
        else:
            raise ConfigError(f"server.enrolled_keys: {p} does not exist")
    return out


def absolute_paths(cfg: FedLoraConfig) -> FedLoraConfig:
    """Every path in the config made absolute against this shell's folder: the ServerApp runs in a
    process whose working folder is Flower's, not the user's."""

    def fix(v: str) -> str:
        return str(Path(v).expanduser().resolve()) if v and Path(v).expanduser().exists() else v

    cfg.run.output_dir = str(Path(cfg.run.output_dir).expanduser().resolve())
    cfg.data.dataset = fix(cfg.data.dataset)
    cfg.data.data_files = {k: [fix(f) for f in v] for k, v in cfg.data.data_files.items()}
    cfg.model.name = fix(cfg.model.name)
    if cfg.model.cache_dir:
        cfg.model.cache_dir = str(Path(cfg.model.cache_dir).expanduser().resolve())
    s = cfg.server
    s.tls_certfile, s.tls_keyfile, s.tls_ca_certfile = fix(s.tls_certfile), fix(s.tls_keyfile), fix(s.tls_ca_certfile)
    s.enrolled_keys = [fix(k) for k in s.enrolled_keys]
    if s.database:
        s.database = str(Path(s.database).expanduser().resolve())
    return cfg


def preflight(cfg: FedLoraConfig, run_dir: RunDir, resume: bool) -> None:
    """What can be checked without a client, checked before the SuperLink starts: a resume of a run
    that already finished, and local data paths that do not exist (the server evaluates on
    ``data.dataset``). A ConfigError says which."""

    check_client_targets(cfg)  # the calibration, before the SuperLink starts
    if resume and (run_dir.path / "summary.json").exists():
        raise ConfigError(
            f"{run_dir.path} finished its {cfg.run.rounds} rounds already (it has summary.json): "
            "nothing to resume; start a new run instead"
        )
    cfg.data.check_local_paths()  # the server evaluates on data.dataset
