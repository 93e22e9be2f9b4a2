"""The `fedlora` command line."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from fedlora.config import ConfigError, FedLoraConfig
from fedlora.deploy.certs_cli import certs_cli

# Each command imports what it runs in its own body (lazy imports below): `fedlora --help` and
# `fedlora config` load neither torch nor Flower, and one command never pays for another's modules.
cli = typer.Typer(
    add_completion=False, no_args_is_help=False, help=__doc__, context_settings={"help_option_names": ["-h", "--help"]}
)


def _load(config: Optional[Path], overrides: list[str]) -> FedLoraConfig:
    try:
        return FedLoraConfig.load(config, overrides)
    except ConfigError as exc:
        typer.secho(f"config error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None


EngineOption = Annotated[
    str,
    typer.Option(
        "--engine",
        help="ray: Flower's simulation engine; inprocess: the same ServerApp and ClientApp in this one process, "
        "clients in turn (debugging; on a machine of few cores also the faster: no Ray start, no actors).",
    ),
]


@cli.command()
def simulate(
    config: Annotated[
        Optional[Path],
        typer.Option(
            "--config",
            "-c",
            help="TOML run config (default: the embedded fortunes run; keys: fedlora config --reference).",
        ),
    ] = None,
    set_: Annotated[
        list[str],
        typer.Option(
            "--set",
            "-s",
            help="Override a key, TOML value: --set lora.rank=4 --set data.dataset='\"../shared/data/agnews\"' (repeatable).",
        ),
    ] = [],  # noqa: B006
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Flower's and Ray's logs.")] = False,
    engine: EngineOption = "ray",
) -> None:
    """Run a federation of virtual clients on this machine (Flower's simulation engine).

    With no options it runs the embedded default (pretrained all-MiniLM-L6-v2 classifying FreeBSD
    fortunes, 10 clients, FedIT). `fedlora config --reference` prints every key of that default
    run, its value and what it means; `fedlora config -c FILE` validates a file of your own.
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from fedlora.rundir import RunDir, round_line
    from fedlora.simulate import simulate as run

    cfg = _load(config, set_)
    console = Console(stderr=True)
    try:
        cfg.data.check_local_paths()  # before the run directory is made
    except ConfigError as exc:
        console.print(f"[red]config error:[/] {exc}")
        raise typer.Exit(2) from None
    run_dir = RunDir.create(cfg)
    data = (
        " -> ".join(cfg.continual.task_names()) + f" ({cfg.continual.method})"
        if cfg.continual.enabled
        else cfg.data.dataset
    )
    console.print(
        f"[bold]fedlora[/] {cfg.run_name()}: {cfg.federation.strategy} | model {cfg.model.name} | data {data} | "
        f"{cfg.federation.num_clients} clients, {cfg.run.rounds} rounds -> {run_dir.path}"
    )
    t0 = time.perf_counter()
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("starting (Ray, model, data)", total=cfg.run.rounds)

        def on_round(row: dict) -> None:
            progress.console.print("  " + round_line(row))
            progress.update(task, completed=row["round"], description=f"round {row['round']}/{cfg.run.rounds}")

        try:
            run(cfg, run_dir=run_dir, on_round=on_round, verbose=verbose, engine=engine)
        except ConfigError as exc:
            console.print(f"[red]config error:[/] {exc}")
            raise typer.Exit(2) from None
    summary = json.loads((run_dir.path / "summary.json").read_text())
    final = summary["final"]
    acc = final.get("server-accuracy", final.get("personal-accuracy-mean"))
    loss = final.get("server-loss", final.get("personal-loss"))
    result = (
        f"final accuracy {acc:.3f}"
        if acc is not None
        else f"final held-out loss {loss:.3f}"
        if loss is not None
        else ""
    )
    console.print(f"[bold green]done[/] in {time.perf_counter() - t0:.0f}s; {result}")
    console.print(f"run directory: {run_dir.path}")


@cli.command()
def compare(
    file: Annotated[Path, typer.Argument(help="Comparison file: [base] config, [[arm]] and [[split]] tables.")],
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Output folder (default runs/compare-<name>).")
    ] = None,
    set_: Annotated[list[str], typer.Option("--set", "-s", help="Override applied to every run.")] = [],  # noqa: B006
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Reuse the cells the output folder's results.json already "
            "holds (a finished run with the cell's exact config); run the rest.",
        ),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Validate every cell and list what would run; run nothing.")
    ] = False,
    arms: Annotated[
        list[str],
        typer.Option(
            "--arm",
            help="Run only this arm (repeatable); the output folder's results "
            "of the other arms are kept as recorded and tabled with it.",
        ),
    ] = [],  # noqa: B006
    engine: EngineOption = "ray",
) -> None:
    """Run several strategies on the same data, splits, seed and budget; write a table and a plot."""
    from fedlora.compare import compare as run

    try:
        folder = run(
            file,
            out,
            set_,
            log=lambda m: typer.echo(m, err=True),
            resume=resume,
            dry_run=dry_run,
            arms=arms or None,
            engine=engine,
        )
    except ConfigError as exc:
        typer.secho(f"config error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    if dry_run:
        return
    typer.echo((folder / "table.md").read_text())
    typer.echo(f"results: {folder}")


@cli.command()
def server(
    config: Annotated[
        Optional[Path],
        typer.Option(
            "--config", "-c", help="TOML run config with a [server] section (address, TLS files, enrolled node keys)."
        ),
    ] = None,
    set_: Annotated[
        list[str],
        typer.Option("--set", "-s", help="Override a key: --set server.address='\"0.0.0.0:9092\"' (repeatable)."),
    ] = [],  # noqa: B006
    resume: Annotated[
        Optional[Path],
        typer.Option("--resume", help="Continue this run directory's run from its last completed round."),
    ] = None,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure", help="No TLS and no node authentication (trials; refused on a public address unless given)."
        ),
    ] = False,
) -> None:
    """Run a real federation: start a SuperLink and run fedlora's ServerApp on it (Flower deployment)."""
    from fedlora.deploy.prechecks import absolute_paths
    from fedlora.deploy.server import serve
    from fedlora.rundir import RunDir, round_line

    if resume is not None:
        if config is not None or set_:
            typer.secho("--resume runs the config saved in the run directory; drop --config/--set", fg="red", err=True)
            raise typer.Exit(2)
        if not (resume / "config.toml").exists():
            typer.secho(f"{resume} is not a run directory (no config.toml)", fg="red", err=True)
            raise typer.Exit(2)
        cfg = _load(resume / "config.toml", [])
        run_dir = RunDir(resume.resolve())
    else:
        cfg = absolute_paths(_load(config, set_))
        run_dir = RunDir.create(cfg)
    t0 = time.perf_counter()
    typer.echo(
        f"fedlora server {cfg.run_name()}: {cfg.federation.strategy} | model {cfg.model.name} | "
        f"{cfg.run.rounds} rounds -> {run_dir.path}",
        err=True,
    )
    try:
        dep = serve(
            cfg,
            run_dir,
            resume=resume is not None,
            insecure=insecure,
            on_round=lambda row: typer.echo("  " + round_line(row), err=True),
            say=lambda m: typer.echo(m, err=True),
        )
    except ConfigError as exc:
        typer.secho(f"config error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    except (RuntimeError, TimeoutError, ValueError) as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(1) from None
    typer.echo(
        f"done in {time.perf_counter() - t0:.0f}s (SuperLink up in {dep.timings.get('superlink-start-seconds', 0):.1f}s); "
        f"run directory: {run_dir.path}",
        err=True,
    )


@cli.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def control(
    ctx: typer.Context,
    run_dir: Annotated[Path, typer.Argument(help="The run directory of a running `fedlora server`.")],
) -> None:
    """Run a command (after --) where the server's SuperLink is reachable: `fedlora control RUN_DIR -- flwr ls fedlora`.

    The SuperLink of `fedlora server` lives in a private network (server.private_network); this joins
    it, with FLWR_HOME set to the run's Flower home, whose connection is named `fedlora`."""
    from fedlora.deploy.isolation import run_inside

    if not ctx.args:
        typer.secho("give the command after --, e.g. fedlora control RUN_DIR -- flwr ls fedlora", fg="red", err=True)
        raise typer.Exit(2)
    try:
        code = run_inside(run_dir.resolve(), list(ctx.args), {"FLWR_HOME": str(run_dir.resolve() / "flwr-home")})
    except (RuntimeError, OSError) as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(1) from None
    raise typer.Exit(code)


@cli.command()
def client(
    settings: Annotated[
        Optional[Path], typer.Option("--settings", help="Small TOML file with the settings below (flags win).")
    ] = None,
    server_address: Annotated[Optional[str], typer.Option("--server", help="The server's host:port.")] = None,
    root_certificates: Annotated[
        Optional[str], typer.Option("--root-certificates", help="CA certificate that signed the server's (PEM).")
    ] = None,
    node_key: Annotated[
        Optional[str],
        typer.Option("--node-key", help="This node's private key (PEM, EC P-384), enrolled on the server."),
    ] = None,
    data: Annotated[
        Optional[str], typer.Option("--data", help="This device's data: a folder (train.jsonl, test.jsonl) or a file.")
    ] = None,
    state_dir: Annotated[
        Optional[str], typer.Option("--state-dir", help="Where this client keeps its state across restarts.")
    ] = None,
    rank: Annotated[Optional[int], typer.Option("--rank", help="LoRA rank this device trains (0 = the run's).")] = None,
    device_class: Annotated[
        Optional[str], typer.Option("--device-class", help="Device class from the run's [hetero] table.")
    ] = None,
    threads: Annotated[
        Optional[int],
        typer.Option(
            "--threads",
            help="Torch threads on this device (0 = the run's train.num_threads); size it to the device, not the server's guess.",
        ),
    ] = None,
    client_id: Annotated[
        Optional[str], typer.Option("--client-id", help="Stable name of this client ('' = the key's file name).")
    ] = None,
    partition_id: Annotated[
        Optional[int],
        typer.Option("--partition-id", help="Trial: use partition N of the run's dataset instead of own data."),
    ] = None,
    insecure: Annotated[
        Optional[bool], typer.Option("--insecure", help="Join a server started with --insecure.")
    ] = None,
    cache_dir: Annotated[
        Optional[str],
        typer.Option(
            "--cache-dir",
            help="This device's model and data cache (default FEDLORA_CACHE or ~/.cache/fedlora); the server's run config cannot choose it.",
        ),
    ] = None,
    model_dir: Annotated[
        Optional[list[str]],
        typer.Option(
            "--model-dir",
            help="A folder a run may name as its base model on this device (repeatable); hub ids and builtins need none.",
        ),
    ] = None,
    cold: Annotated[
        bool, typer.Option("--cold", help="Flower's default isolation: a fresh process (and model load) per message.")
    ] = False,
    executor: Annotated[
        Optional[str],
        typer.Option(
            "--executor",
            help="How the resident executor runs tasks: fork (from the warm process), worker (one spawned process per run, no fork), auto (worker for a run on CUDA).",
        ),
    ] = None,
) -> None:
    """Join a real federation from this device (Flower SuperNode + fedlora's ClientApp)."""
    from fedlora.deploy.client import ClientSettings, run_client

    try:
        s = ClientSettings.load(
            settings,
            {
                "server": server_address,
                "root_certificates": root_certificates,
                "node_key": node_key,
                "data": data,
                "state_dir": state_dir,
                "rank": rank,
                "device_class": device_class,
                "client_id": client_id,
                "partition_id": partition_id,
                "insecure": insecure,
                "threads": threads,
                "cache_dir": cache_dir,
                "model_dirs": model_dir or None,
                "executor": executor,
            },
        )
    except (ConfigError, TypeError) as exc:
        typer.secho(f"client settings error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(run_client(s, cold=cold, say=lambda m: typer.echo(m, err=True)))


cli.add_typer(certs_cli, name="certs")


@cli.command()
def strategies() -> None:
    """List the registered strategies and what each shares."""
    from fedlora.registry import get_strategy, strategy_names

    for name in strategy_names():
        cls = get_strategy(name)
        doc = (cls.__module__ and sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        typer.echo(f"{name:10s} {cls.sharing_policy.describe():45s} {doc}")


@cli.command()
def methods() -> None:
    """List the plug-in methods (fedlora/methods and installed entry points): name, config section, summary."""
    from fedlora.registry import plugin_extensions

    for ext in plugin_extensions():
        if ext.__module__.startswith("fedlora.methods") or not ext.__module__.startswith("fedlora."):
            what = f"continual.method={ext.continual_method}" if ext.continual_method else ""
            doc = (ext.__doc__ or "").strip().splitlines()[0] if ext.__doc__ else ""
            typer.echo(f"{ext.name:10s} [{ext.section_name}] {what:24s} {doc}")


@cli.command("config")
def show_config(
    config: Annotated[
        Optional[Path],
        typer.Option("--config", "-c", help="TOML run config to validate (default: the embedded default run)."),
    ] = None,
    set_: Annotated[
        list[str], typer.Option("--set", "-s", help="Override a key, TOML value: --set lora.rank=4 (repeatable).")
    ] = [],  # noqa: B006
    reference: Annotated[
        bool,
        typer.Option(
            "--reference",
            help="Print every key with its value in the run `fedlora simulate` would do, and its help, as TOML.",
        ),
    ] = False,
    format_: Annotated[
        str,
        typer.Option(
            "--format", help="With --reference: toml, or markdown (docs/configuration.md is this for the default run)."
        ),
    ] = "toml",
) -> None:
    """Validate a config and print it, as TOML, with every default filled in."""
    cfg = _load(config, set_)
    from fedlora.privacy.accounting import check_client_targets

    try:
        check_client_targets(cfg)  # what a run's start checks: a privacy target the run cannot meet
    except ConfigError as exc:
        typer.secho(f"config error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    if reference:
        from fedlora.config import reference_markdown, reference_toml

        if format_ not in ("toml", "markdown"):
            typer.secho(f"--format must be toml or markdown, got {format_!r}", fg="red", err=True)
            raise typer.Exit(2)
        typer.echo(reference_toml(cfg) if format_ == "toml" else reference_markdown(cfg))
        return
    typer.echo(cfg.to_toml())


def main() -> None:
    from fedlora.env import apply_defaults

    apply_defaults()
    cli()


if __name__ == "__main__":
    main()
