"""`fedlora certs`: test credentials for a local trial (a CA, the server's certificate, node keys).

Loads no torch or Flower: the key material is made by :mod:`fedlora.deploy.pki` when a command runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


class _CertsGroup(typer.core.TyperGroup):
    """`fedlora certs FOLDER` is `fedlora certs create FOLDER`; `fedlora certs add-node FOLDER` adds one."""

    def resolve_command(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["create", *args]
        return super().resolve_command(ctx, args)


certs_cli = typer.Typer(
    cls=_CertsGroup,
    no_args_is_help=True,
    help="Test credentials for a local trial: a CA, "
    "the server's certificate, node keys (use your own CA in production).",
)


def _node_lines(nodes) -> None:
    for n in nodes:
        typer.echo(
            f"node {n.name}: private {n.private_key} (copy to that device only, then delete it here), "
            f"public {n.public_key} (the server enrols {n.public_key.parent})"
        )


@certs_cli.command("create")
def certs(
    folder: Annotated[
        Path, typer.Argument(help="Where to write ca.crt, server.crt/.key, enrol/node-N.pub and devices/node-N.key.")
    ],
    nodes: Annotated[int, typer.Option("--nodes", "-n", help="Node key pairs to create.")] = 2,
    host: Annotated[
        list[str],
        typer.Option(
            "--host",
            help="Server name or IP the certificate is valid for (repeatable; 127.0.0.1 and localhost always).",
        ),
    ] = [],  # noqa: B006
    force: Annotated[
        bool,
        typer.Option("--force", help="Replace existing credentials (every device must then get the new CA and keys)."),
    ] = False,
) -> None:
    """Create a test CA, a server certificate and node keys (refuses to overwrite without --force)."""
    from fedlora.deploy.pki import CredentialsExist, create_credentials

    try:
        c = create_credentials(folder, [*host, "127.0.0.1", "localhost"], nodes, force=force)
    except CredentialsExist as exc:
        typer.secho(f"fedlora certs: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"CA {c.ca_cert}\nserver certificate {c.server_cert} (key {c.server_key}, private)")
    _node_lines(c.nodes)


@certs_cli.command("add-node")
def certs_add_node(
    folder: Annotated[Path, typer.Argument(help="The credentials folder `fedlora certs` made.")],
    name: Annotated[str, typer.Option("--name", help="The node's name (default: the next node-N).")] = "",
    force: Annotated[bool, typer.Option("--force", help="Replace that node's existing key pair.")] = False,
) -> None:
    """Add one node key pair: devices/NAME.key (private) and enrol/NAME.pub (to enrol on the server)."""
    from fedlora.deploy.pki import ENROL_DIR, CredentialsExist, node_key_pair

    if not (folder / "ca.crt").exists():
        typer.secho(
            f"fedlora certs add-node: {folder} holds no ca.crt; create it with `fedlora certs {folder}`",
            fg="red",
            err=True,
        )
        raise typer.Exit(2)
    if not name:
        taken = {p.stem for p in (folder / ENROL_DIR).glob("node-*.pub")}
        name = next(f"node-{i}" for i in range(len(taken) + 1) if f"node-{i}" not in taken)
    try:
        _node_lines([node_key_pair(folder, name, force=force)])
    except (CredentialsExist, ValueError) as exc:
        typer.secho(f"fedlora certs add-node: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
