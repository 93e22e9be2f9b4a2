"""The `fedlora` command line."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from fedlora.config import ConfigError, FedLoraConfig

cli = typer.Typer(add_completion=False, no_args_is_help=False, help=__doc__,
                  context_settings={"help_option_names": ["-h", "--help"]})


def _load(config: Optional[Path], overrides: list[str]) -> FedLoraConfig:
    try:
        return FedLoraConfig.load(config, overrides)
    except ConfigError as exc:
        typer.secho(f"config error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None


@cli.command()
def simulate(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML run config (default: the embedded fortunes run; keys: fedlora config --reference).")] = None,
    set_: Annotated[list[str], typer.Option("--set", "-s", help="Override a key, TOML value: --set lora.rank=4 --set data.dataset='\"../shared/data/agnews\"' (repeatable).")] = [],  # noqa: B006
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Flower's and Ray's logs.")] = False,
) -> None:
    """Run a federation of virtual clients on this machine (Flower's simulation engine).

    With no options it runs the embedded default (pretrained all-MiniLM-L6-v2 classifying FreeBSD
    fortunes, 10 clients, FedIT). `fedlora config --reference` prints every key of that default
    run, its value and what it means; `fedlora config -c FILE` validates a file of your own.
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from fedlora.rundir import RunDir
    from fedlora.simulate import simulate as run

    cfg = _load(config, set_)
    console = Console(stderr=True)
    run_dir = RunDir.create(cfg)
    console.print(f"[bold]fedlora[/] {cfg.run_name()}: {cfg.federation.strategy} | model {cfg.model.name} | data {cfg.data.dataset} | "
                  f"{cfg.federation.num_clients} clients, {cfg.run.rounds} rounds -> {run_dir.path}")
    t0 = time.perf_counter()
    with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        task = progress.add_task("starting (Ray, model, data)", total=cfg.run.rounds)

        def on_round(row: dict) -> None:
            parts = [f"round {row['round']}"]
            for key, label in (("server-accuracy", "acc"), ("personal-accuracy-mean", "personal acc"),
                               ("personal-accuracy-worst", "worst")):
                if row.get(key) is not None:
                    parts.append(f"{label} {row[key]:.3f}")
            if row.get("client-epsilon") is not None:
                parts.append(f"eps {row['client-epsilon']:.2f}")
            if row.get("dp-sgd-epsilon-max") is not None:
                parts.append(f"dp-sgd eps {row['dp-sgd-epsilon-max']:.2f}")
            if row.get("bytes-up-per-client"):
                parts.append(f"up {row['bytes-up-per-client'] / 1e3:.1f} kB/client")
            parts.append(f"{row['seconds']:.1f}s")
            progress.console.print("  " + " | ".join(parts))
            progress.update(task, completed=row["round"], description=f"round {row['round']}/{cfg.run.rounds}")

        try:
            run(cfg, run_dir=run_dir, on_round=on_round, verbose=verbose)
        except ConfigError as exc:
            console.print(f"[red]config error:[/] {exc}")
            raise typer.Exit(2) from None
    summary = json.loads((run_dir.path / "summary.json").read_text())
    final = summary["final"]
    acc = final.get("server-accuracy", final.get("personal-accuracy-mean"))
    console.print(f"[bold green]done[/] in {time.perf_counter() - t0:.0f}s; final accuracy "
                  f"{acc:.3f}" if acc is not None else "done")
    console.print(f"run directory: {run_dir.path}")


@cli.command()
def compare(
    file: Annotated[Path, typer.Argument(help="Comparison file: [base] config, [[arm]] and [[split]] tables.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (default runs/compare-<name>).")] = None,
    set_: Annotated[list[str], typer.Option("--set", "-s", help="Override applied to every run.")] = [],  # noqa: B006
) -> None:
    """Run several strategies on the same data, splits, seed and budget; write a table and a plot."""
    from fedlora.compare import compare as run

    try:
        folder = run(file, out, set_, log=lambda m: typer.echo(m, err=True))
    except ConfigError as exc:
        typer.secho(f"config error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    typer.echo((folder / "table.md").read_text())
    typer.echo(f"results: {folder}")


@cli.command()
def strategies() -> None:
    """List the registered strategies and what each shares."""
    from fedlora.registry import get_strategy, strategy_names

    for name in strategy_names():
        cls = get_strategy(name)
        doc = (cls.__module__ and sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        typer.echo(f"{name:10s} {cls.sharing_policy.describe():45s} {doc}")


@cli.command("config")
def show_config(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML run config to validate (default: the embedded default run).")] = None,
    set_: Annotated[list[str], typer.Option("--set", "-s", help="Override a key, TOML value: --set lora.rank=4 (repeatable).")] = [],  # noqa: B006
    reference: Annotated[bool, typer.Option("--reference", help="Print every key with its value in the run `fedlora simulate` would do, and its help, as TOML.")] = False,
) -> None:
    """Validate a config and print it, as TOML, with every default filled in."""
    cfg = _load(config, set_)
    if reference:
        from fedlora.config import reference_toml

        typer.echo(reference_toml(cfg))
        return
    typer.echo(cfg.to_toml())


def main() -> None:
    from fedlora.env import apply_defaults

    apply_defaults()
    cli()


if __name__ == "__main__":
    main()
