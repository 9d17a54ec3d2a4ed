"""The `kvc` command."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import click

from certs.cli import certs as certs_group
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
@click.option(
    "--node-data-root",
    default="/var/lib/kvc",
    show_default=True,
    help="Node path under which every agent keeps its data (the hostPath workloads mount).",
)
@click.option(
    "--agent-grace",
    default=45.0,
    show_default=True,
    help="Seconds without a heartbeat after which a node's agent is gone and its replicas move.",
)
@click.option(
    "--allowed-data-root",
    "allowed_data_roots",
    multiple=True,
    metavar="NODE_PATH",
    help="A node path under which users may put data with options.dataPath (repeatable; default: none).",
)
def run_controller(
    namespaces: tuple[str, ...],
    liveness_endpoint: str | None,
    node_data_root: str,
    agent_grace: float,
    allowed_data_roots: tuple[str, ...],
) -> None:
    """The VolumeManager controller."""
    from kvc.controller import run as run_kopf  # noqa: PLC0415 - imports kopf only for this command

    run_kopf(namespaces, liveness_endpoint, node_data_root, agent_grace, allowed_data_roots)


@run.command("agent")
@click.option("--node", required=True, envvar="NODE_NAME", help="This node's name (from the downward API).")
@click.option(
    "--data-root",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("/var/lib/kvc"),
    show_default=True,
    help="Local directory holding this node's data.",
)
@click.option(
    "--node-data-root",
    default="/var/lib/kvc",
    show_default=True,
    help="The node path that --data-root stands for (differs only when simulating nodes).",
)
@click.option(
    "--extra-root",
    "extra_roots",
    multiple=True,
    metavar="NODE_PATH=DIR",
    help="Another allowed data root (for options.dataPath) and the local directory holding it (repeatable).",
)
@click.option("--heartbeat", default=10.0, show_default=True, help="Seconds between status reports.")
@click.option("--verify-interval", default=60.0, show_default=True, help="Seconds between size checks of Ready data.")
@click.option(
    "--deep-verify-interval",
    default=6 * 3600.0,
    show_default=True,
    help="Seconds between re-reads of Ready data against the source's checksums.",
)
def run_agent(
    node: str,
    data_root: Path,
    node_data_root: str,
    extra_roots: tuple[str, ...],
    heartbeat: float,
    verify_interval: float,
    deep_verify_interval: float,
) -> None:
    """The node agent: fetches the replicas assigned to this node."""
    from kvc import kube  # noqa: PLC0415
    from kvc.agent.agent import Agent  # noqa: PLC0415

    roots = {}
    for mapping in extra_roots:
        node_path, separator, local = mapping.partition("=")
        if not separator or not node_path.startswith("/") or not local:
            raise click.BadParameter(f"{mapping!r}: expected NODE_PATH=DIR", param_hint="--extra-root")
        roots[node_path] = Path(local)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    agent = Agent(
        node,
        data_root,
        kube.api_client(),
        node_data_root=node_data_root,
        extra_roots=roots,
        heartbeat_seconds=heartbeat,
        verify_seconds=verify_interval,
        deep_verify_seconds=deep_verify_interval,
    )
    agent.run(stop)


@run.command("webhook")
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")  # noqa: S104
@click.option("--port", default=9443, show_default=True, help="HTTPS port.")
@click.option(
    "--cert-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="Serving certificate.",
)
@click.option(
    "--key-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True, help="Its private key."
)
def run_webhook(host: str, port: int, cert_file: Path, key_file: Path) -> None:
    """The mutating admission webhook (HTTPS only)."""
    from kvc import kube  # noqa: PLC0415
    from webhook.server import run as serve  # noqa: PLC0415

    serve(host, port, cert_file, key_file, kube.api_client())


cli.add_command(certs_group)


def main() -> None:
    cli()
