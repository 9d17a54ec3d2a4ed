"""The `kvc` command."""

from __future__ import annotations

import click

from kvc import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """KVC: bring datasets and models to the Kubernetes nodes where ML jobs run."""


@cli.command()
def version() -> None:
    """Print the KVC version."""
    click.echo(f"kvc {__version__}")


def main() -> None:
    cli()
