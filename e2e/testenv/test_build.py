"""The control-plane build's pure parts: version pins, lock-file generation and checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from e2e.testenv import build

RELEASE_GOMOD = """module k8s.io/kubernetes

go 1.26.0

require (
\tk8s.io/api v0.0.0
\tk8s.io/klog/v2 v2.140.0
)

replace (
\tk8s.io/api => ./staging/src/k8s.io/api
\tk8s.io/client-go => ./staging/src/k8s.io/client-go
\tgithub.com/example/forked => github.com/example/forked v1.2.3
)

replace go.etcd.io/etcd/api/v3 => ../api
"""


def test_local_replaces_finds_only_directory_targets() -> None:
    assert build._local_replaces(RELEASE_GOMOD) == ["k8s.io/api", "k8s.io/client-go", "go.etcd.io/etcd/api/v3"]


def test_go_directive_is_read_from_the_release() -> None:
    assert build._go_directive(RELEASE_GOMOD) == "1.26.0"
    with pytest.raises(build.TestenvError, match="no go directive"):
        build._go_directive("module x\n")


def test_wrapper_gomod_pins_the_release_and_maps_each_staging_module() -> None:
    text = build._wrapper_gomod(
        name="kubernetes",
        go="1.26.0",
        main="k8s.io/kubernetes",
        version="v1.37.2",
        replaces={"k8s.io/client-go": "v0.37.2", "k8s.io/api": "v0.37.2"},
        tools=["k8s.io/kubernetes/cmd/kube-apiserver"],
    )
    assert "require k8s.io/kubernetes v1.37.2\n" in text
    assert "\tk8s.io/api => k8s.io/api v0.37.2\n\tk8s.io/client-go => k8s.io/client-go v0.37.2\n" in text
    assert "tool k8s.io/kubernetes/cmd/kube-apiserver" in text
    assert "go 1.26.0" in text


def test_versions_are_loaded_and_validated(tmp_path: Path) -> None:
    good = tmp_path / "v.toml"
    good.write_text('kubernetes = "v1.37.2"\netcd = "v3.7.3"\nkwok = "v0.8.0"\n')
    versions = build.load_versions(good)
    assert versions.key == "k8s-v1.37.2_etcd-v3.7.3_kwok-v0.8.0"
    bad = tmp_path / "bad.toml"
    bad.write_text('kubernetes = "latest"\netcd = "v3.7.3"\nkwok = "v0.8.0"\n')
    with pytest.raises(build.TestenvError, match="kubernetes = 'latest' is not a release version"):
        build.load_versions(bad)
    missing = tmp_path / "missing.toml"
    missing.write_text('kubernetes = "v1.37.2"\n')
    with pytest.raises(build.TestenvError, match="missing version for 'etcd'"):
        build.load_versions(missing)


def test_committed_lock_files_match_the_pinned_versions() -> None:
    versions = build.load_versions()
    build._check_lockfile("kubernetes", "k8s.io/kubernetes", versions.kubernetes)
    build._check_lockfile("etcd", "go.etcd.io/etcd/server/v3", versions.etcd)
    build._check_lockfile("kwok", "sigs.k8s.io/kwok", versions.kwok)


def test_a_stale_lock_file_is_reported_with_the_fix() -> None:
    with pytest.raises(build.TestenvError, match="run `make testenv-update`"):
        build._check_lockfile("kubernetes", "k8s.io/kubernetes", "v1.99.0")


def test_cache_lives_outside_the_repository(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KVC_TESTENV_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    versions = build.load_versions()
    assert build.bin_dir(versions) == tmp_path / "kvc" / "testenv" / versions.key / "bin"
    assert sorted(build.missing_binaries(versions)) == sorted(build.ALL_BINARIES)


def test_missing_go_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(build.TestenvError, match="`go` is not on PATH"):
        build.go_env()


def test_failure_hints_name_the_fix() -> None:
    assert "make testenv-update" in build._hint("verifying k8s.io/api@v0.37.2: checksum mismatch")
    assert "module proxy could not be reached" in build._hint("dial tcp: lookup proxy.golang.org: no such host")
    assert build._hint("undefined: foo") == ""
