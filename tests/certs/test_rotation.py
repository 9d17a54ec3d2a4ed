from __future__ import annotations

import datetime as dt
from dataclasses import replace

import pytest

from certs import pki
from certs.rotation import Policy, Step, TLSState, describe, install, rotate, serving_problem

NOW = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)
POLICY = Policy(dns_names=("kvc-webhook", "kvc-webhook.kvc-system.svc"), ip_addresses=("127.0.0.1",))


def final(steps: list[Step], start: TLSState | None = None) -> TLSState:
    return steps[-1].state if steps else (start or TLSState())


def trusted(serving: pki.CertKeyPair, bundle: tuple[bytes, ...]) -> bool:
    return any(pki.is_signed_by(serving.certificate, ca) for pem in bundle for ca in pki.load_certificates(pem))


def assert_no_request_can_fail(start: TLSState, steps: list[Step]) -> None:
    """Publishing the steps in order, each replica serving the old or the new certificate
    meanwhile, the API server always trusts what is served."""
    served = [start.serving] if start.serving else []
    for step in steps:
        if step.serving_changed:
            assert step.state.serving is not None
            served.append(step.state.serving)
        for certificate in served[-2:]:  # replicas not reloaded yet serve the previous one
            assert trusted(certificate, step.state.bundle), step.reasons


@pytest.fixture(scope="module")
def installed() -> TLSState:
    return final(install(TLSState(), POLICY, NOW))


def test_install_creates_a_ca_a_bundle_and_a_serving_certificate_for_the_names(installed: TLSState) -> None:
    assert installed.ca is not None
    assert installed.serving is not None
    assert installed.bundle == (installed.ca.cert_pem,)
    assert pki.subject_alt_names(installed.serving.certificate) == (list(POLICY.dns_names), ["127.0.0.1"])
    assert serving_problem(installed, POLICY, NOW) is None


def test_install_is_idempotent(installed: TLSState) -> None:
    assert install(installed, POLICY, NOW) == []
    assert rotate(installed, POLICY, NOW) == []


def test_new_names_get_a_new_serving_certificate_from_the_same_ca(installed: TLSState) -> None:
    wider = replace(POLICY, dns_names=(*POLICY.dns_names, "kvc-webhook.kvc-system.svc.cluster.local"))
    (step,) = install(installed, wider, NOW)
    assert step.serving_changed
    assert not step.bundle_changed
    assert step.state.ca == installed.ca
    assert "covers" in step.reasons[0]


@pytest.mark.parametrize("new_ca", [False, True], ids=["serving-renewal", "ca-rollover"])
def test_rotation_without_the_extra_names_keeps_them(installed: TLSState, new_ca: bool) -> None:
    # Installed with --dns/--ip; the scheduled `kvc certs rotate` runs without them.
    extra = replace(POLICY, dns_names=(*POLICY.dns_names, "kvc.example.com"), ip_addresses=("127.0.0.1", "10.0.0.9"))
    wide = final(install(installed, extra, NOW), installed)
    base = replace(POLICY, ip_addresses=())
    assert rotate(wide, base, NOW) == []
    renewed = final(rotate(wide, base, NOW, force=True, new_ca=new_ca))
    assert renewed.serving is not None
    dns, ips = pki.subject_alt_names(renewed.serving.certificate)
    assert set(dns) == {*POLICY.dns_names, "kvc.example.com"}
    assert set(ips) == {"127.0.0.1", "10.0.0.9"}


def test_install_sets_the_names_exactly(installed: TLSState) -> None:
    extra = replace(POLICY, dns_names=(*POLICY.dns_names, "kvc.example.com"))
    wide = final(install(installed, extra, NOW), installed)
    narrowed = final(install(wide, POLICY, NOW), wide)
    assert narrowed.serving is not None
    assert "kvc.example.com" not in pki.subject_alt_names(narrowed.serving.certificate)[0]


def test_a_serving_certificate_near_expiry_is_renewed_and_nothing_else(installed: TLSState) -> None:
    later = NOW + POLICY.validity - POLICY.renew_before + dt.timedelta(hours=1)
    (step,) = rotate(installed, POLICY, later)
    assert step.serving_changed
    assert not step.bundle_changed
    assert "expires" in step.reasons[0]
    assert step.state.serving is not None
    assert step.state.serving.certificate.not_valid_after_utc > installed.serving.certificate.not_valid_after_utc  # type: ignore[union-attr]


def test_a_ca_rollover_keeps_both_cas_trusted_and_waits_before_serving_the_new_one(installed: TLSState) -> None:
    steps = rotate(installed, POLICY, NOW, new_ca=True)
    assert [(s.bundle_changed, s.serving_changed, s.wait_after) for s in steps] == [
        (True, False, True),
        (False, True, False),
    ]
    rolled = final(steps)
    assert rolled.ca != installed.ca
    assert rolled.bundle == (installed.bundle[0], rolled.ca.cert_pem)  # type: ignore[union-attr]
    assert_no_request_can_fail(installed, steps)
    # Nothing is pruned in the same run, even with no overlap asked for.
    assert rotate(rolled, replace(POLICY, overlap=dt.timedelta(0)), NOW) != []  # prunes only on a later run
    assert len(rolled.bundle) == 2


def test_the_old_ca_leaves_the_bundle_only_after_the_overlap(installed: TLSState) -> None:
    rolled = final(rotate(installed, POLICY, NOW, new_ca=True))
    assert rotate(rolled, POLICY, NOW + POLICY.overlap - dt.timedelta(minutes=1)) == []
    (prune,) = rotate(rolled, POLICY, NOW + POLICY.overlap)
    assert prune.state.bundle == (rolled.ca.cert_pem,)  # type: ignore[union-attr]
    assert "overlap over" in prune.reasons[0]
    assert_no_request_can_fail(rolled, [prune])


def test_a_ca_near_expiry_is_rolled_without_being_asked(installed: TLSState) -> None:
    later = NOW + POLICY.ca_validity - POLICY.ca_renew_before + dt.timedelta(days=1)
    steps = rotate(installed, POLICY, later)
    assert steps[0].ca_changed
    assert "the CA expires" in steps[0].reasons[0]
    assert_no_request_can_fail(installed, steps)


def test_a_serving_certificate_from_another_ca_is_replaced(installed: TLSState) -> None:
    foreign = pki.new_serving_cert(pki.new_ca("other"), list(POLICY.dns_names), list(POLICY.ip_addresses))
    (step,) = install(replace(installed, serving=foreign), POLICY, NOW)
    assert "not signed by the current CA" in step.reasons[0]


def test_a_ca_missing_from_the_bundle_is_added_back_before_anything_else(installed: TLSState) -> None:
    steps = install(replace(installed, bundle=()), POLICY, NOW)
    assert steps[0].bundle_changed
    assert steps[0].state.bundle == installed.bundle


def test_describe_names_subject_sans_and_expiry(installed: TLSState) -> None:
    lines = describe(installed, NOW)
    assert lines[0].startswith("serving  CN=kvc-webhook  expires ")
    assert "expires 2027-11-28 12:00 UTC (365 days left)" in lines[0]
    assert lines[1] == "         SANs: kvc-webhook, kvc-webhook.kvc-system.svc, 127.0.0.1"
    assert any(line.startswith("trusted  CN=kvc-webhook-ca") for line in lines)
    assert "EXPIRED" in describe(installed, NOW + dt.timedelta(days=4000))[0]
    assert describe(TLSState(), NOW) == ["serving  none: run `kvc certs install`"]
