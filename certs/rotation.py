"""What `kvc certs install` and `kvc certs rotate` change, decided without touching the cluster.

The webhook's TLS material is a signing CA, the bundle of CAs the API server trusts
(``caBundle``), and the serving certificate. A rotation must never leave the API server
facing a certificate it does not trust, so a new CA is rolled in steps, each published
before the next is computed:

1. the new CA joins the bundle (the serving certificate is still signed by the old one);
2. once the bundle has reached the API server, a serving certificate signed by the new CA;
3. on a later run, after ``overlap`` (time for every webhook replica to load step 2),
   the old CA leaves the bundle.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace

from cryptography import x509

from certs import pki


@dataclass(frozen=True)
class Policy:
    """Names the serving certificate must cover, and how long things live."""

    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...] = ()
    validity: dt.timedelta = pki.DEFAULT_LEAF_VALIDITY
    ca_validity: dt.timedelta = pki.DEFAULT_CA_VALIDITY
    # Renew the serving certificate when it expires sooner than this.
    renew_before: dt.timedelta = dt.timedelta(days=30)
    # Roll a new CA when the current one expires sooner than this.
    ca_renew_before: dt.timedelta = dt.timedelta(days=90)
    # How long an old CA stays trusted after a new one was rolled.
    overlap: dt.timedelta = dt.timedelta(hours=24)


@dataclass(frozen=True)
class TLSState:
    """The TLS material as stored: the signing CA, the trusted bundle, the serving pair."""

    ca: pki.CertKeyPair | None = None
    bundle: tuple[bytes, ...] = ()  # PEM of each trusted CA, oldest first
    serving: pki.CertKeyPair | None = None
    rolled_at: dt.datetime | None = None  # when ``ca`` joined the bundle

    @property
    def bundle_pem(self) -> bytes:
        return b"".join(self.bundle)


@dataclass(frozen=True)
class Step:
    """A state to publish, and why. ``wait_after`` asks the caller to let the API server
    pick the bundle up before publishing the next step."""

    state: TLSState
    reasons: tuple[str, ...]
    wait_after: bool = False
    bundle_changed: bool = False
    serving_changed: bool = False
    ca_changed: bool = False


def _expires_within(cert: x509.Certificate, margin: dt.timedelta, now: dt.datetime) -> bool:
    return cert.not_valid_after_utc - now <= margin


def serving_problem(state: TLSState, policy: Policy, now: dt.datetime) -> str | None:
    """Why the serving certificate must be replaced, or None when it is fine."""
    if state.serving is None:
        return "there is no serving certificate"
    cert = state.serving.certificate
    if state.ca is None or not pki.is_signed_by(cert, state.ca.certificate):
        return "the serving certificate is not signed by the current CA"
    dns, ips = pki.subject_alt_names(cert)
    if sorted(dns) != sorted(policy.dns_names) or sorted(ips) != sorted(policy.ip_addresses):
        wanted = ", ".join(policy.dns_names + policy.ip_addresses)
        return f"the serving certificate covers {', '.join(dns + ips)}, not {wanted}"
    if _expires_within(cert, policy.renew_before, now):
        return f"the serving certificate expires {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    return None


def _ca_problem(state: TLSState, policy: Policy, now: dt.datetime) -> str | None:
    if state.ca is None:
        return "there is no CA"
    if _expires_within(state.ca.certificate, policy.ca_renew_before, now):
        return f"the CA expires {state.ca.certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    return None


def _with_ca_in_bundle(state: TLSState, ca: pki.CertKeyPair) -> TLSState:
    if ca.cert_pem in state.bundle:
        return state
    return replace(state, bundle=(*state.bundle, ca.cert_pem))


def _roll_ca(state: TLSState, policy: Policy, now: dt.datetime, reason: str) -> Step:
    ca = pki.new_ca("kvc-webhook-ca", policy.ca_validity, now)
    rolled = _with_ca_in_bundle(replace(state, ca=ca, rolled_at=now), ca)
    # Only wait when a certificate from the old CA is being served: nothing to protect otherwise.
    return Step(
        rolled,
        (f"new CA: {reason}",),
        wait_after=state.serving is not None,
        bundle_changed=True,
        ca_changed=True,
    )


def _renew_serving(state: TLSState, ca: pki.CertKeyPair, policy: Policy, now: dt.datetime, reason: str) -> Step:
    serving = pki.new_serving_cert(ca, list(policy.dns_names), list(policy.ip_addresses), policy.validity, now)
    return Step(replace(state, serving=serving), (f"new serving certificate: {reason}",), serving_changed=True)


def _prune(state: TLSState, policy: Policy, now: dt.datetime) -> Step | None:
    """Drop CAs that no longer need trusting: expired ones, and old ones after the overlap."""
    if state.ca is None or state.serving is None:
        return None
    overlap_over = state.rolled_at is None or now - state.rolled_at >= policy.overlap
    serving_from_current = pki.is_signed_by(state.serving.certificate, state.ca.certificate)
    kept, dropped = [], []
    for pem in state.bundle:
        (cert,) = pki.load_certificates(pem)
        current = pem == state.ca.cert_pem
        expired = cert.not_valid_after_utc <= now
        if current or (not expired and not (overlap_over and serving_from_current)):
            kept.append(pem)
        else:
            dropped.append(f"CA {pki.fingerprint(cert)} leaves the bundle ({'expired' if expired else 'overlap over'})")
    if not dropped:
        return None
    return Step(replace(state, bundle=tuple(kept)), tuple(dropped), bundle_changed=True)


def install(state: TLSState, policy: Policy, now: dt.datetime) -> list[Step]:
    """What to publish so that a valid CA, bundle and serving certificate exist (idempotent)."""
    steps: list[Step] = []
    if state.ca is None:
        steps.append(_roll_ca(state, policy, now, "there is no CA"))
    current = steps[-1].state if steps else state
    ca = current.ca
    if ca is None:  # pragma: no cover - a CA was just made
        raise RuntimeError("no CA after install")
    if ca.cert_pem not in current.bundle:
        current = _with_ca_in_bundle(current, ca)
        steps.append(Step(current, ("the CA was missing from the bundle",), wait_after=True, bundle_changed=True))
    problem = serving_problem(current, policy, now)
    if problem:
        steps.append(_renew_serving(current, ca, policy, now, problem))
    return steps


def _keeping_served_names(state: TLSState, policy: Policy) -> Policy:
    if state.serving is None:
        return policy
    dns, ips = pki.subject_alt_names(state.serving.certificate)
    return replace(
        policy,
        dns_names=tuple(dict.fromkeys([*policy.dns_names, *dns])),
        ip_addresses=tuple(dict.fromkeys([*policy.ip_addresses, *ips])),
    )


def rotate(
    state: TLSState, policy: Policy, now: dt.datetime, *, new_ca: bool = False, force: bool = False
) -> list[Step]:
    """Renew what is due (or forced): CA rollover in steps, the serving certificate, pruning.

    Renewal keeps every name the served certificate covers (those given to ``install``
    with --dns/--ip too), so a scheduled run without those options never narrows it;
    ``install`` is where the names are set exactly.
    """
    policy = _keeping_served_names(state, policy)
    ca_reason = "asked for (--ca)" if new_ca else _ca_problem(state, policy, now)
    if state.ca is not None and ca_reason:
        roll = _roll_ca(_with_ca_in_bundle(state, state.ca), policy, now, ca_reason)
        new_ca_pair = roll.state.ca
        if new_ca_pair is None:  # pragma: no cover - a CA was just made
            raise RuntimeError("no CA after a rollover")
        return [roll, _renew_serving(roll.state, new_ca_pair, policy, now, "the CA was rolled")]
    steps = install(state, policy, now)
    current = steps[-1].state if steps else state
    if force and current.ca is not None and not any(step.serving_changed for step in steps):
        steps.append(_renew_serving(current, current.ca, policy, now, "asked for (--force)"))
    if steps:
        # Never prune in the run that changed something: a replica may still serve the
        # previous certificate until it reloads.
        return steps
    pruned = _prune(state, policy, now)
    return [pruned] if pruned else []


def describe(state: TLSState, now: dt.datetime) -> list[str]:
    """Human-readable lines about each certificate: subject, SANs, issuer, expiry."""

    def line(role: str, cert: x509.Certificate) -> str:
        left = cert.not_valid_after_utc - now
        status = "EXPIRED" if left.total_seconds() <= 0 else f"{left.days} days left"
        return (
            f"{role:<8} {cert.subject.rfc4514_string()}  expires {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC "
            f"({status})  sha256 {pki.fingerprint(cert)}"
        )

    lines: list[str] = []
    if state.serving is None:
        lines.append("serving  none: run `kvc certs install`")
    else:
        cert = state.serving.certificate
        lines.append(line("serving", cert))
        dns, ips = pki.subject_alt_names(cert)
        lines.append(f"         SANs: {', '.join(dns + ips)}")
        lines.append(f"         issuer: {cert.issuer.rfc4514_string()}")
    if state.ca is not None:
        lines.append(line("CA", state.ca.certificate))
    for pem in state.bundle:
        for cert in pki.load_certificates(pem):
            lines.append(line("trusted", cert))
    return lines
