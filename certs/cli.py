"""`kvc certs`: install, rotate and show the webhook's TLS certificates."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from typing import Any, TypeVar

import click

from certs import pki, rotation, store
from kvc.api.units import parse_duration

F = TypeVar("F", bound=Callable[..., Any])


def _duration(ctx: click.Context, param: click.Parameter, value: str) -> dt.timedelta:
    try:
        return dt.timedelta(seconds=parse_duration(value))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def _where(function: F) -> F:
    """The options naming the Secrets, the Service and the webhook configuration."""
    options = [
        click.option("-n", "--namespace", default="kvc-system", show_default=True, help="KVC's namespace."),
        click.option("--service", default="kvc-webhook", show_default=True, help="The webhook's Service."),
        click.option("--secret", default="kvc-webhook-tls", show_default=True, help="Serving certificate Secret."),
        click.option("--ca-secret", default="kvc-webhook-ca", show_default=True, help="Signing CA Secret."),
        click.option(
            "--webhook-config",
            default="kvc-webhook",
            show_default=True,
            help="MutatingWebhookConfiguration whose caBundle is kept in step ('' for none).",
        ),
        click.option("--dns", "extra_dns", multiple=True, metavar="NAME", help="Another DNS name (repeatable)."),
        click.option("--ip", "ips", multiple=True, metavar="ADDRESS", help="An IP address SAN, for local runs."),
        click.option(
            "--validity", default="8760h", show_default=True, callback=_duration, help="Serving certificate lifetime."
        ),
        click.option("--ca-validity", default="87600h", show_default=True, callback=_duration, help="CA lifetime."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _settings(params: dict[str, Any]) -> tuple[store.Location, rotation.Policy]:
    location = store.Location(params["namespace"], params["secret"], params["ca_secret"], params["webhook_config"])
    names = pki.service_dns_names(params["service"], params["namespace"]) + list(params["extra_dns"])
    policy = rotation.Policy(
        dns_names=tuple(dict.fromkeys(names)),
        ip_addresses=tuple(params["ips"]),
        validity=params["validity"],
        ca_validity=params["ca_validity"],
    )
    return location, policy


def _api() -> Any:
    from kvc import kube  # noqa: PLC0415 - the cluster client loads only when a command runs

    try:
        return kube.api_client()
    except Exception as exc:
        raise click.ClickException(f"no cluster to talk to: {exc}") from exc


def _apply(api: Any, location: store.Location, steps: list[rotation.Step], wait: float) -> None:
    _, versions = store.read_state(api, location)
    for index, step in enumerate(steps):
        store.publish(api, location, step, versions)
        for reason in step.reasons:
            click.echo(reason)
        if step.wait_after and index < len(steps) - 1:
            click.echo(f"waiting {wait:g}s for the API server to trust the new CA")
            time.sleep(wait)
    if not steps:
        click.echo("nothing to do: the certificates are valid")


def _run(action: Callable[[], None]) -> None:
    try:
        action()
    except store.StoreError as exc:
        raise click.ClickException(str(exc)) from exc


_PROPAGATION_WAIT = click.option(
    "--propagation-wait",
    default="10s",
    show_default=True,
    callback=_duration,
    help="Pause after a caBundle change before serving from a new CA.",
)


@click.group("certs")
def certs() -> None:
    """The webhook's TLS certificates: install, rotate, show."""


@certs.command()
@_where
@_PROPAGATION_WAIT
def install(propagation_wait: dt.timedelta, **params: Any) -> None:
    """Create the CA and serving certificate and patch caBundle (does nothing when all is valid)."""
    location, policy = _settings(params)

    def act() -> None:
        api = _api()
        state, _ = store.read_state(api, location)
        now = dt.datetime.now(dt.UTC)
        steps = rotation.install(state, policy, now)
        if not steps and location.webhook_config and store.webhook_bundle(api, location) != state.bundle_pem:
            steps = [rotation.Step(state, ("caBundle differed from the Secret's",), bundle_changed=True)]
        _apply(api, location, steps, propagation_wait.total_seconds())

    _run(act)


@certs.command()
@_where
@click.option("--ca", "new_ca", is_flag=True, help="Roll a new CA now (the old one stays trusted for --overlap).")
@click.option("--force", is_flag=True, help="Renew the serving certificate even if it is not due.")
@click.option(
    "--renew-before",
    default="720h",
    show_default=True,
    callback=_duration,
    help="Renew the serving certificate when it expires sooner.",
)
@click.option(
    "--ca-renew-before",
    default="2160h",
    show_default=True,
    callback=_duration,
    help="Roll a new CA when the current one expires sooner.",
)
@click.option(
    "--overlap",
    default="24h",
    show_default=True,
    callback=_duration,
    help="How long an old CA stays trusted after a new one.",
)
@_PROPAGATION_WAIT
def rotate(
    new_ca: bool,
    force: bool,
    renew_before: dt.timedelta,
    ca_renew_before: dt.timedelta,
    overlap: dt.timedelta,
    propagation_wait: dt.timedelta,
    **params: Any,
) -> None:
    """Renew what is due; run it regularly (e.g. a daily CronJob). No request fails meanwhile."""
    location, policy = _settings(params)
    policy = rotation.Policy(
        **{**vars(policy), "renew_before": renew_before, "ca_renew_before": ca_renew_before, "overlap": overlap}
    )

    def act() -> None:
        api = _api()
        state, _ = store.read_state(api, location)
        steps = rotation.rotate(state, policy, dt.datetime.now(dt.UTC), new_ca=new_ca, force=force)
        _apply(api, location, steps, propagation_wait.total_seconds())

    _run(act)


@certs.command()
@_where
def show(**params: Any) -> None:
    """Print each certificate's subject, SANs and expiry, and whether caBundle matches."""
    location, _ = _settings(params)

    def act() -> None:
        api = _api()
        state, _ = store.read_state(api, location)
        for line in rotation.describe(state, dt.datetime.now(dt.UTC)):
            click.echo(line)
        bundle = store.webhook_bundle(api, location)
        if bundle is not None:
            verdict = "matches the Secret" if bundle == state.bundle_pem else "DIFFERS: run `kvc certs install`"
            click.echo(f"caBundle of {location.webhook_config}: {verdict}")

    _run(act)
