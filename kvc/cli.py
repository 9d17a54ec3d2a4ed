"""The `kvc` command."""

from __future__ import annotations

import datetime as dt
import email.utils
import json
import logging
import os
import signal
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import click

from certs.cli import certs as certs_group
from kvc import __version__, defaults, logs
from kvc.agent.files import MAX_OBJECTS
from kvc.api import names
from kvc.inspect import (
    DATASET_HEADERS,
    HeartbeatUnreadable,
    Selector,
    controller_heartbeat,
    dataset_rows,
    parse_selector,
    render_table,
    status_report,
)
from kvc.policy import (
    DEFAULT_MAX_REPLICAS_PER_NAMESPACE,
    DEFAULT_MAX_REPLICAS_PER_NODE,
    ETCD_REQUEST_BYTES,
    MAX_ENTRY_BYTES,
    AdminPolicy,
    NfsExport,
    TolerationRule,
)
from kvc.sources._egress import DEFAULT_BLOCKED, EgressPolicy


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    envvar="KVC_LOG_FORMAT",
    help="json: one JSON object per line, for log collectors.",
)
def cli(verbose: bool, log_format: str) -> None:
    """KVC: bring datasets and models to the Kubernetes nodes where ML jobs run."""
    logs.configure(verbose=verbose, json_lines=log_format == "json")


@cli.command()
def version() -> None:
    """Print the KVC version."""
    click.echo(f"kvc {__version__}")


class _Failure(click.ClickException):
    """An error shown as one line, ``kvc: <message>``, with exit code 1."""

    def show(self, file: IO[Any] | None = None) -> None:
        # Messages quote the API server, which may answer with several lines.
        click.echo(f"kvc: {' '.join(self.format_message().split())}", err=True)


# (connect, read) seconds: a CLI should give up on an unreachable cluster rather than hang.
_REQUEST_TIMEOUT = (10, 60)
_LIST_PAGE = 500


class _Cluster:
    """The kubeconfig's cluster, as `kvc status` and `kvc datasets` read it; failures become one line."""

    def __init__(self) -> None:
        import yaml  # noqa: PLC0415
        from kubernetes import client, config  # noqa: PLC0415 - slow to import; only these commands need it

        configuration = client.Configuration()
        try:
            config.load_kube_config(client_configuration=configuration)
            _, context = config.list_kube_config_contexts()
        except (config.ConfigException, yaml.YAMLError, OSError) as exc:
            location = os.environ.get("KUBECONFIG") or "~/.kube/config"
            raise _Failure(f"no usable kubeconfig at {location}: {exc} (set KUBECONFIG to a kubeconfig file)") from None
        self.namespace: str = (context.get("context") or {}).get("namespace") or "default"
        self.host: str = configuration.host
        api = client.ApiClient(configuration)
        self.custom = client.CustomObjectsApi(api)
        self.coordination = client.CoordinationV1Api(api)
        if not logging.getLogger().isEnabledFor(logging.DEBUG):
            # urllib3 logs a warning per retried connection: the one error line below says it all.
            logging.getLogger("urllib3").setLevel(logging.ERROR)

    def volumemanager(self, namespace: str, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call(
            self.custom.get_namespaced_custom_object,
            names.GROUP,
            names.VERSION,
            namespace,
            names.VOLUMEMANAGER_PLURAL,
            name,
            not_found=f'volumemanager "{name}" not found in namespace "{namespace}"',
        )
        return result

    def controller_lease(self, namespace: str) -> tuple[Mapping[str, Any] | HeartbeatUnreadable | None, dt.datetime]:
        """The controller's heartbeat Lease (None: there is none) and the API server's time of its
        answer (else this machine's). Never fails: the command shows what it could not read."""
        from kubernetes.client.rest import ApiException  # noqa: PLC0415
        from urllib3.exceptions import HTTPError  # noqa: PLC0415

        here_now = dt.datetime.now(dt.UTC)
        try:
            response = self.coordination.read_namespaced_lease(
                names.CONTROLLER_LEASE, namespace, _preload_content=False, _request_timeout=_REQUEST_TIMEOUT
            )
            lease = json.loads(response.data)
        except ApiException as exc:
            if exc.status == 404:
                return None, here_now
            if exc.status == 403:
                # Tenants may not read kvc-system by default (see the user guide).
                reason = f"forbidden to read Lease {namespace}/{names.CONTROLLER_LEASE}"
            else:
                reason = f"the API server answered {exc.status} {exc.reason}"
            return HeartbeatUnreadable(reason), here_now
        except (HTTPError, OSError) as exc:
            return HeartbeatUnreadable(f"cannot reach the cluster at {self.host}: {_root_cause(exc)}"), here_now
        except ValueError:
            return HeartbeatUnreadable("the API server's answer is not JSON"), here_now
        if not isinstance(lease, dict):
            return HeartbeatUnreadable("the API server's answer is not a Lease"), here_now
        return lease, _server_time(response.headers) or here_now

    def volumemanagers(self, namespace: str | None) -> list[dict[str, Any]]:
        """Every VolumeManager in a namespace, or in all of them (None), page by page."""
        items: list[dict[str, Any]] = []
        token = None
        while True:
            page: dict[str, Any] = {"limit": _LIST_PAGE, **({"_continue": token} if token else {})}
            if namespace is None:
                listed = self._call(
                    self.custom.list_cluster_custom_object,
                    names.GROUP,
                    names.VERSION,
                    names.VOLUMEMANAGER_PLURAL,
                    forbidden_hint="; -n NAMESPACE searches one namespace",
                    **page,
                )
            else:
                listed = self._call(
                    self.custom.list_namespaced_custom_object,
                    names.GROUP,
                    names.VERSION,
                    namespace,
                    names.VOLUMEMANAGER_PLURAL,
                    **page,
                )
            items.extend(listed.get("items") or [])
            token = (listed.get("metadata") or {}).get("continue")
            if not token:
                return items

    def _call(
        self, method: Callable[..., Any], *args: Any, not_found: str = "", forbidden_hint: str = "", **kwargs: Any
    ) -> Any:
        from kubernetes.client.rest import ApiException  # noqa: PLC0415
        from urllib3.exceptions import HTTPError  # noqa: PLC0415

        try:
            return method(*args, _request_timeout=_REQUEST_TIMEOUT, **kwargs)
        except ApiException as exc:
            raise _Failure(_api_error(exc, not_found, forbidden_hint)) from None
        except (HTTPError, OSError) as exc:
            raise _Failure(f"cannot reach the cluster at {self.host}: {_root_cause(exc)}") from None


def _api_error(exc: Any, not_found: str, forbidden_hint: str) -> str:
    """One line for an error status from the API server."""
    try:
        body = json.loads(exc.body or "")
    except (TypeError, ValueError):
        body = None
    body = body if isinstance(body, dict) else {}
    message = body.get("message") or (exc.body or "").strip() or exc.reason
    if exc.status == 404:
        # A missing object names itself in the details; a 404 without them is a missing API.
        if not_found and (body.get("details") or {}).get("name"):
            return not_found
        return (
            f"the cluster does not serve {names.VOLUMEMANAGER_PLURAL}.{names.GROUP}/{names.VERSION}:"
            " are KVC's CRDs installed?"
        )
    if exc.status == 401:
        return "the cluster rejected the kubeconfig's credentials (401 Unauthorized)"
    if exc.status == 403:
        return f"forbidden: {message}{forbidden_hint}"
    return f"the API server answered {exc.status} {exc.reason}: {message}"


def _server_time(headers: Any) -> dt.datetime | None:
    """The time in an HTTP answer's Date header; None when it has none or it is malformed."""
    try:
        value = headers.get("Date") if headers is not None else None
        return email.utils.parsedate_to_datetime(value) if value else None
    except (TypeError, ValueError):
        return None


def _root_cause(exc: BaseException) -> str:
    """The innermost reason of a connection error, e.g. "Connection refused", not urllib3's wrappers."""
    cause: BaseException = exc
    for _ in range(10):
        inner = getattr(cause, "reason", None)
        following = inner if isinstance(inner, BaseException) else cause.__cause__ or cause.__context__
        if following is None:
            break
        cause = following
    if isinstance(cause, OSError) and cause.strerror:
        return str(cause.strerror)
    return str(cause) or type(cause).__name__


@cli.command("status")
@click.argument("name", metavar="VOLUMEMANAGER")
@click.option(
    "-n", "--namespace", help="The VolumeManager's namespace (default: the kubeconfig context's, else default)."
)
@click.option(
    "--kvc-namespace",
    default=names.KVC_NAMESPACE,
    show_default=True,
    envvar="KVC_NAMESPACE",
    help=f"Where KVC's controller runs: its heartbeat Lease ({names.CONTROLLER_LEASE}) there says whether it is alive.",
)
def status_command(name: str, namespace: str | None, kvc_namespace: str) -> None:
    """Show a VolumeManager's volumes, node by node, and whether the controller is alive.

    Node-local volumes (S3, HTTP) list every node holding or fetching their data, with progress;
    NFS and PVC volumes show the claim that workloads mount.
    """
    cluster = _Cluster()
    vm = cluster.volumemanager(namespace or cluster.namespace, name)
    lease, now = cluster.controller_lease(kvc_namespace)
    click.echo(status_report(vm, controller=controller_heartbeat(lease, now, kvc_namespace)))


def _parse_selectors(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> Selector:
    try:
        return tuple(requirement for value in values for requirement in parse_selector(value))
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


@cli.command("datasets")
@click.option(
    "-l",
    "--selector",
    multiple=True,
    metavar="SELECTOR",
    callback=_parse_selectors,
    help="Label requirements: key=value, key!=value, key or !key, comma-separated or repeated; all must hold.",
)
@click.option("-A", "--all-namespaces", is_flag=True, help="Search every namespace.")
@click.option("-n", "--namespace", help="Search this namespace (default: the kubeconfig context's, else default).")
def datasets_command(selector: Selector, all_namespaces: bool, namespace: str | None) -> None:
    """Find volumes by their labels.

    Lists every volume (an entry of spec.volumeConfigs) whose labels meet all -l requirements,
    with its phase and replicas; without -l, every volume.
    """
    if all_namespaces and namespace:
        raise click.UsageError("use either -A/--all-namespaces or -n/--namespace, not both")
    cluster = _Cluster()
    scope = None if all_namespaces else namespace or cluster.namespace
    rows = dataset_rows(cluster.volumemanagers(scope), selector)
    if not rows:
        matching = f" matching {','.join(map(str, selector))}" if selector else ""
        where = "any namespace" if scope is None else f'namespace "{scope}"'
        click.echo(f"No volumes{matching} in {where}.", err=True)
        return
    click.echo(render_table(DATASET_HEADERS, rows))


@cli.group()
def run() -> None:
    """Run a KVC component in the foreground."""


_METRICS_PORT = click.option(
    "--metrics-port", default=0, show_default=True, help="Serve Prometheus /metrics on this port (0: off)."
)


def _parse_rules(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...], parse: Callable[[str], Any]
) -> tuple[Any, ...]:
    """A repeatable admin allowlist flag, each value parsed: a bad one stops the command."""
    try:
        return tuple(parse(value) for value in values)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


def _quantity_flag(ctx: click.Context, param: click.Parameter, value: str) -> int:
    """A flag's Kubernetes quantity (5Gi) in bytes; a bad one stops the command."""
    from kvc.api.units import parse_quantity  # noqa: PLC0415

    try:
        return parse_quantity(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


def _capacity_flag(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """A capacity, checked to be a positive quantity and kept as written (it reaches the agents so)."""
    if _quantity_flag(ctx, param, value) <= 0:
        raise click.BadParameter(f"{value!r} is not a positive quantity", ctx, param)
    return value


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
    default=defaults.NODE_DATA_ROOT,
    show_default=True,
    help="Node path under which every agent keeps its data (the hostPath workloads mount).",
)
@click.option(
    "--agent-grace",
    default=defaults.AGENT_GRACE_SECONDS,
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
@click.option(
    "--default-capacity",
    default=defaults.NODE_CAPACITY,
    show_default=True,
    metavar="QUANTITY",
    callback=_capacity_flag,
    help=(
        "The bytes a replica of an S3 or HTTP volume without capacity may take on a node: its agent stops "
        "writing past them and fails the volume (archives that expand further included)."
    ),
)
@click.option(
    "--allowed-toleration",
    "allowed_tolerations",
    multiple=True,
    metavar="KEY[=VALUE][:EFFECT]",
    callback=lambda ctx, param, values: _parse_rules(ctx, param, values, TolerationRule.parse),
    help=(
        "Taints whose tolerations volumes may carry, to put replicas on tainted nodes: KEY any toleration "
        "of that key, =VALUE only operator Equal with it, :EFFECT only that effect, * any key (also "
        "'tolerate everything'). Repeatable; default: none, so control-plane nodes and tainted pools hold "
        "no tenant's data."
    ),
)
@click.option(
    "--allowed-nfs-server",
    "allowed_nfs_servers",
    multiple=True,
    metavar="SERVER[:/PATH-PREFIX]",
    callback=lambda ctx, param, values: _parse_rules(ctx, param, values, NfsExport.parse),
    help=(
        "An NFS server (and a path prefix, matched by whole components) that NFS volumes may mount; "
        "* any server. Repeatable; default: none, as the kubelet mounts exports with the node's identity."
    ),
)
@click.option(
    "--max-replicas-per-node",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_REPLICAS_PER_NODE,
    show_default=True,
    help=(
        f"Replicas one node's VolumeNode may hold: each takes up to {MAX_ENTRY_BYTES // 1024} KiB of it, "
        f"and etcd refuses objects over {ETCD_REQUEST_BYTES // 1024} KiB."
    ),
)
@click.option(
    "--max-replicas-per-namespace",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_REPLICAS_PER_NAMESPACE,
    show_default=True,
    help="Replicas the volumes of one namespace may have on nodes in all; a volume beyond it is Failed.",
)
@click.option(
    "--credentials-namespace",
    default=names.DEFAULT_CREDENTIALS_NAMESPACE,
    show_default=True,
    envvar="KVC_CREDENTIALS_NAMESPACE",
    help=(
        "KVC's namespace for copies of the credentials Secrets that replicas need: the only namespace "
        "whose Secrets the agents may read. Never kvc-system, which holds the webhook's CA."
    ),
)
@click.option(
    "--lease-namespace",
    default=names.KVC_NAMESPACE,
    show_default=True,
    envvar="POD_NAMESPACE",
    help=(
        f"Namespace of the heartbeat Lease ({names.CONTROLLER_LEASE}) the controller renews while it runs, "
        "which `kvc status` reads: the controller's own (POD_NAMESPACE, from the downward API)."
    ),
)
@click.option(
    "--lease-duration",
    type=click.IntRange(min=3),
    default=names.CONTROLLER_LEASE_SECONDS,
    show_default=True,
    help="Seconds after its last renewal that the heartbeat counts as stale; it is renewed every third of them.",
)
@_METRICS_PORT
def run_controller(
    namespaces: tuple[str, ...],
    liveness_endpoint: str | None,
    node_data_root: str,
    agent_grace: float,
    allowed_data_roots: tuple[str, ...],
    default_capacity: str,
    allowed_tolerations: tuple[TolerationRule, ...],
    allowed_nfs_servers: tuple[NfsExport, ...],
    max_replicas_per_node: int,
    max_replicas_per_namespace: int,
    credentials_namespace: str,
    lease_namespace: str,
    lease_duration: int,
    metrics_port: int,
) -> None:
    """The VolumeManager controller."""
    from kvc import metrics  # noqa: PLC0415
    from kvc.controller import lease, limit_malloc_arenas  # noqa: PLC0415 - imports kopf only for this command
    from kvc.controller import run as run_kopf  # noqa: PLC0415

    limit_malloc_arenas()  # before any thread starts
    metrics.serve(metrics_port)
    policy = AdminPolicy(allowed_tolerations, allowed_nfs_servers, max_replicas_per_node, max_replicas_per_namespace)
    run_kopf(
        namespaces,
        liveness_endpoint,
        node_data_root,
        agent_grace,
        allowed_data_roots,
        credentials_namespace,
        policy=policy,
        default_capacity=default_capacity,
        heartbeat=lease.HeartbeatSettings(namespace=lease_namespace, duration_seconds=lease_duration),
    )


def _egress_policy(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> EgressPolicy:
    try:
        return EgressPolicy.from_flags(values)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


@run.command("agent")
@click.option("--node", required=True, envvar="NODE_NAME", help="This node's name (from the downward API).")
@click.option(
    "--data-root",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(defaults.NODE_DATA_ROOT),
    show_default=True,
    help="Local directory holding this node's data.",
)
@click.option(
    "--node-data-root",
    default=defaults.NODE_DATA_ROOT,
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
@click.option(
    "--min-free-disk",
    default="1Gi",
    show_default=True,
    metavar="QUANTITY",
    callback=_quantity_flag,
    help=(
        "Free space left on the data root's file system: under it no fetch starts and a running one stops "
        "writing (looked at every 32 MiB written), failing its volume with a message. 0: no floor."
    ),
)
@click.option(
    "--max-objects",
    type=click.IntRange(min=1),
    default=MAX_OBJECTS,
    show_default=True,
    help=(
        "Objects (S3 keys, archive members) one replica may hold: a longer listing fails its volume. "
        "Bounds the agent's memory: about 1 KiB per object a fetch holds."
    ),
)
@click.option(
    "--blocked-network",
    "blocked_networks",
    multiple=True,
    default=("default",),
    show_default=True,
    metavar="CIDR",
    callback=_egress_policy,
    help=(
        "A network fetches never connect to: a URL, a redirect or an S3 endpoint whose host resolves into it "
        "fails its volume. Repeatable; giving it replaces the default list, which 'default' stands for: "
        f"{', '.join(DEFAULT_BLOCKED)} (link-local and cloud instance metadata). 'none' blocks nothing."
    ),
)
@_METRICS_PORT
def run_agent(
    node: str,
    data_root: Path,
    node_data_root: str,
    extra_roots: tuple[str, ...],
    heartbeat: float,
    verify_interval: float,
    deep_verify_interval: float,
    min_free_disk: int,
    max_objects: int,
    blocked_networks: EgressPolicy,
    metrics_port: int,
) -> None:
    """The node agent: fetches the replicas assigned to this node."""
    from kvc import kube, metrics  # noqa: PLC0415
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
    metrics.serve(metrics_port)
    agent = Agent(
        node,
        data_root,
        kube.api_client(),
        node_data_root=node_data_root,
        extra_roots=roots,
        heartbeat_seconds=heartbeat,
        verify_seconds=verify_interval,
        deep_verify_seconds=deep_verify_interval,
        egress=blocked_networks,
        min_free_disk=min_free_disk,
        max_objects=max_objects,
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
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=0,
    envvar="KVC_WEBHOOK_WORKERS",
    help="Processes serving the port, each with its own index. 0: one per CPU the container may use, at most 4.",
)
@click.option(
    "--inject-host-path",
    is_flag=True,
    envvar="KVC_WEBHOOK_INJECT_HOST_PATH",
    help=(
        "Wire S3/HTTP data into pods as a hostPath instead of through its claim. Single-tenant "
        "clusters only: hostPath pods need Pod Security `privileged`, which lets any pod of the "
        "namespace mount any host path."
    ),
)
@click.option(
    "--client-ca-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    envvar="KVC_WEBHOOK_CLIENT_CA_FILE",
    help=(
        "Answer admission requests only from clients with a certificate of this CA: the API server's "
        "(its AdmissionConfiguration). Without it anyone who reaches the port may ask."
    ),
)
@click.option(
    "--client-name",
    "client_names",
    multiple=True,
    envvar="KVC_WEBHOOK_CLIENT_NAMES",
    help="With --client-ca-file: the certificate's CN or DNS name must be one of these (repeatable).",
)
def run_webhook(
    host: str,
    port: int,
    cert_file: Path,
    key_file: Path,
    workers: int,
    inject_host_path: bool,
    client_ca_file: Path | None,
    client_names: tuple[str, ...],
) -> None:
    """The mutating admission webhook (HTTPS only)."""
    import functools  # noqa: PLC0415

    from kvc import kube  # noqa: PLC0415
    from webhook.server import Settings  # noqa: PLC0415
    from webhook.workers import default_workers, run  # noqa: PLC0415

    # Worker processes start afresh: they set up logging as this command was told to.
    options = click.get_current_context().find_root().params
    setup_logging = functools.partial(
        logs.configure, verbose=options["verbose"], json_lines=options["log_format"] == "json"
    )
    settings = Settings(
        host,
        port,
        cert_file,
        key_file,
        api_client=kube.api_client,
        setup_logging=setup_logging,
        inject_host_path=inject_host_path,
        client_ca_file=client_ca_file,
        client_names=client_names,
    )
    run(settings, workers or default_workers())


cli.add_command(certs_group)


def main() -> None:
    cli()
