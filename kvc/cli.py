"""The `kvc` command."""

from __future__ import annotations

import logging

import click

from kvc import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def cli(verbose: bool) -> None:
    """KVC: bring datasets and models to the Kubernetes nodes where ML jobs run."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@cli.command()
def version() -> None:
    """Print the KVC version."""
    click.echo(f"kvc {__version__}")


@cli.group()
def run() -> None:
    """Run a KVC component in the foreground."""


@run.command("controller")
@click.option("-n", "--namespace", "namespaces", multiple=True, help="Watch only these namespaces (default: all).")
@click.option(
    "--liveness-endpoint",
    default=None,
    metavar="URL",
    help="Serve a liveness probe, e.g. http://0.0.0.0:8080/healthz.",
)
def run_controller(namespaces: tuple[str, ...], liveness_endpoint: str | None) -> None:
    """The VolumeManager controller."""
    from kvc.controller import run as run_kopf  # noqa: PLC0415 - imports kopf only for this command

    run_kopf(namespaces, liveness_endpoint)


def main() -> None:
    cli()
