"""Build and cache the local control plane used by the e2e tests and the demo.

kube-apiserver, kube-controller-manager, kube-scheduler and kubectl come from the
``k8s.io/kubernetes`` module, etcd from ``go.etcd.io/etcd/server/v3`` and kwok from
``sigs.k8s.io/kwok``, all through the Go module proxy, at the versions pinned in
``versions.toml``.  ``k8s.io/kubernetes`` and etcd cannot be ``go install``-ed because
their go.mod files map sibling modules to local directories; each is therefore built from
a small wrapper module (``gomod/<name>/go.mod``) whose ``replace`` lines are generated
from the release's own go.mod by ``update``.  The wrapper go.mod/go.sum files are lock
files: committed, regenerated only by ``python -m e2e.testenv.build update``.

Binaries land outside the repository (CI builds in a fresh clone) under
``${KVC_TESTENV_DIR:-${XDG_CACHE_HOME:-~/.cache}/kvc/testenv}/<versions>/bin`` and are
never rebuilt once present.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
VERSIONS_FILE = HERE / "versions.toml"
GOMOD_DIR = HERE / "gomod"

KUBERNETES_BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
ALL_BINARIES = (*KUBERNETES_BINARIES, "etcd", "kwok")


class TestenvError(RuntimeError):
    """A problem the user can act on; printed as one clear line."""


@dataclass(frozen=True)
class Versions:
    kubernetes: str
    etcd: str
    kwok: str

    @property
    def key(self) -> str:
        return f"k8s-{self.kubernetes}_etcd-{self.etcd}_kwok-{self.kwok}"


def load_versions(path: Path = VERSIONS_FILE) -> Versions:
    data = tomllib.loads(path.read_text())
    try:
        versions = Versions(data["kubernetes"], data["etcd"], data["kwok"])
    except KeyError as exc:
        raise TestenvError(f"{path}: missing version for {exc.args[0]!r}") from None
    for name, value in vars(versions).items():
        if not re.fullmatch(r"v\d+\.\d+\.\d+", value):
            raise TestenvError(f"{path}: {name} = {value!r} is not a release version like v1.2.3")
    return versions


def cache_root() -> Path:
    explicit = os.environ.get("KVC_TESTENV_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "kvc" / "testenv"


def bin_dir(versions: Versions | None = None) -> Path:
    return cache_root() / (versions or load_versions()).key / "bin"


def missing_binaries(versions: Versions | None = None) -> list[str]:
    directory = bin_dir(versions)
    return [name for name in ALL_BINARIES if not (directory / name).is_file()]


def _log(message: str) -> None:
    print(f"[testenv] {message}", file=sys.stderr, flush=True)


def go_env() -> dict[str, str]:
    if shutil.which("go") is None:
        raise TestenvError(
            "`go` is not on PATH: install Go >= 1.26 (https://go.dev/doc/install or your package manager) "
            "and run `make testenv` again"
        )
    env = dict(os.environ)
    env.update(
        CGO_ENABLED="0",
        # Never fetch another toolchain: the build must use the Go that is installed.
        GOTOOLCHAIN="local",
        # The checksum database is not reachable from every build machine; the committed
        # go.sum files are the pin and Go verifies every download against them.
        GOSUMDB="off",
        GOFLAGS="-mod=readonly -buildvcs=false",
    )
    return env


def _hint(output: str) -> str:
    """What to do about the usual causes of a failed Go command."""
    if any(
        word in output
        for word in ("verifying", "checksum mismatch", "missing go.sum entry", "updates to go.mod needed")
    ):
        return "\n(hint: the pinned go.mod/go.sum do not match; run `make testenv-update` if versions.toml changed)"
    if any(
        word in output for word in ("dial tcp", "no such host", "proxyconnect", "i/o timeout", "connection refused")
    ):
        return "\n(hint: the Go module proxy could not be reached; check GOPROXY and the network)"
    return ""


def run_go(cmd: list[str], cwd: Path, env: dict[str, str], what: str) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-25:])
        raise TestenvError(f"{what} failed ({' '.join(cmd[:3])} ...):\n{tail}{_hint(tail)}")
    return proc.stdout


# --------------------------------------------------------------------------- update


def _fetch_release_gomod(module: str, version: str, env: dict[str, str]) -> str:
    """The release's own go.mod, as the module proxy serves it (via `go mod download`)."""
    scratch = cache_root() / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / "go.mod").write_text("module scratch\n")
    out = run_go(
        ["go", "mod", "download", "-json", f"{module}@{version}"],
        scratch,
        {**env, "GOFLAGS": "-mod=mod"},
        f"downloading {module}@{version}",
    )
    info = json.loads(out)
    if info.get("Error"):
        raise TestenvError(f"downloading {module}@{version}: {info['Error']}")
    return Path(info["GoMod"]).read_text()


def _local_replaces(gomod: str) -> list[str]:
    """Module paths that a go.mod replaces with a local directory (``=> ./x`` or ``=> ../x``)."""
    found = []
    for line in gomod.splitlines():
        match = re.match(r"^\s*(?:replace\s+)?(\S+)(?:\s+\S+)?\s*=>\s*(\.\.?/\S*)\s*$", line)
        if match:
            found.append(match.group(1))
    return found


def _go_directive(gomod: str) -> str:
    match = re.search(r"^go\s+(\S+)", gomod, re.M)
    if not match:
        raise TestenvError("release go.mod has no go directive")
    return match.group(1)


def _module_version_exists(module: str, version: str, env: dict[str, str]) -> bool:
    scratch = cache_root() / "scratch"
    proc = subprocess.run(
        ["go", "list", "-m", "-json", f"{module}@{version}"],
        cwd=scratch,
        env={**env, "GOFLAGS": "-mod=mod"},
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode == 0:
        return True
    if "not available" in proc.stderr or "unknown revision" in proc.stderr or "not found" in proc.stderr:
        return False
    raise TestenvError(f"looking up {module}@{version}: {proc.stderr.strip()}")


def _wrapper_gomod(*, name: str, go: str, main: str, version: str, replaces: dict[str, str], tools: list[str]) -> str:
    lines = [
        "// Generated by `python -m e2e.testenv.build update` from versions.toml and the",
        "// release's own go.mod. Do not edit: change versions.toml and regenerate.",
        f"module kvc.testenv/{name}",
        "",
        f"go {go}",
        "",
        f"require {main} {version}",
        "",
    ]
    if replaces:
        lines.append("replace (")
        lines += [f"\t{module} => {module} {target}" for module, target in sorted(replaces.items())]
        lines += [")", ""]
    lines += [f"tool {tool}" for tool in tools]
    return "\n".join(lines) + "\n"


def update(versions: Versions) -> None:
    """Regenerate the wrapper modules (go.mod + go.sum) for the pinned versions."""
    env = go_env()
    k8s_minor = versions.kubernetes.split(".")[1]
    staging_version = f"v0.{k8s_minor}.{versions.kubernetes.split('.')[2]}"

    specs: list[tuple[str, str, str, dict[str, str], list[str]]] = []

    k8s_mod = _fetch_release_gomod("k8s.io/kubernetes", versions.kubernetes, env)
    staging = _local_replaces(k8s_mod)
    _log(f"k8s.io/kubernetes {versions.kubernetes}: {len(staging)} staging modules replaced locally")
    replaces: dict[str, str] = {}
    for module in staging:
        # A few staging modules (samples) are never published; they are not in the build graph.
        if _module_version_exists(module, staging_version, env):
            replaces[module] = staging_version
        else:
            _log(f"  {module}@{staging_version} is not published; left out (not needed by the binaries)")
    tools = [f"k8s.io/kubernetes/cmd/{binary}" for binary in KUBERNETES_BINARIES]
    specs.append(("kubernetes", "k8s.io/kubernetes", versions.kubernetes, replaces, tools))

    etcd_mod = _fetch_release_gomod("go.etcd.io/etcd/server/v3", versions.etcd, env)
    etcd_replaces = dict.fromkeys(_local_replaces(etcd_mod), versions.etcd)
    specs.append(("etcd", "go.etcd.io/etcd/server/v3", versions.etcd, etcd_replaces, ["go.etcd.io/etcd/server/v3"]))

    kwok_mod = _fetch_release_gomod("sigs.k8s.io/kwok", versions.kwok, env)
    if _local_replaces(kwok_mod):
        raise TestenvError("sigs.k8s.io/kwok now has local replace lines; teach update() about them")
    specs.append(("kwok", "sigs.k8s.io/kwok", versions.kwok, {}, ["sigs.k8s.io/kwok/cmd/kwok"]))

    go_versions = {
        "kubernetes": _go_directive(k8s_mod),
        "etcd": _go_directive(etcd_mod),
        "kwok": _go_directive(kwok_mod),
    }
    for name, main, version, repl, tool_list in specs:
        directory = GOMOD_DIR / name
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "go.mod").write_text(
            _wrapper_gomod(name=name, go=go_versions[name], main=main, version=version, replaces=repl, tools=tool_list)
        )
        (directory / "go.sum").write_text("")
        _log(f"resolving {name} ({main}@{version}) ...")
        run_go(["go", "mod", "tidy"], directory, {**env, "GOFLAGS": "-mod=mod"}, f"go mod tidy for {name}")
        _log(f"  wrote {directory.relative_to(HERE.parent.parent)}/go.mod and go.sum")


# --------------------------------------------------------------------------- build


def _check_lockfile(name: str, main: str, version: str) -> Path:
    directory = GOMOD_DIR / name
    gomod = directory / "go.mod"
    if not gomod.is_file() or not (directory / "go.sum").is_file():
        raise TestenvError(f"{directory} has no go.mod/go.sum; run `make testenv-update`")
    if not re.search(rf"^\s*(require\s+)?{re.escape(main)} {re.escape(version)}(\s*//.*)?$", gomod.read_text(), re.M):
        raise TestenvError(
            f"{gomod} does not pin {main} {version} from versions.toml; run `make testenv-update` and commit the result"
        )
    return directory


def _ldflags_kubernetes(version: str) -> str:
    major, minor = version.lstrip("v").split(".")[:2]
    build_date = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    flags = ["-s", "-w"]
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {package}.gitVersion={version}",
            f"-X {package}.gitMajor={major}",
            f"-X {package}.gitMinor={minor}",
            f"-X {package}.gitTreeState=clean",
            f"-X {package}.buildDate={build_date}",
        ]
    return " ".join(flags)


def _build(
    *,
    directory: Path,
    packages: list[str],
    out: Path,
    ldflags: str,
    env: dict[str, str],
    what: str,
    rename: dict[str, str] | None = None,
) -> None:
    rename = rename or {}
    staging = out / f".partial-{os.getpid()}"
    staging.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    _log(f"building {what} (a cold build takes many minutes on 2 cores) ...")
    cmd = [
        "go",
        "build",
        "-v",
        "-trimpath",
        "-tags",
        "selinux,notest",
        "-ldflags",
        ldflags,
        "-o",
        f"{staging}/",
        *packages,
    ]
    proc = subprocess.Popen(cmd, cwd=directory, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    recent: list[str] = []
    last_report = started
    for compiled, line in enumerate(proc.stdout, start=1):
        recent = [*recent[-39:], line.rstrip()]
        if time.monotonic() - last_report >= 30:
            last_report = time.monotonic()
            _log(f"  {what}: {compiled} packages so far, {last_report - started:.0f}s elapsed")
    if proc.wait() != 0:
        shutil.rmtree(staging, ignore_errors=True)
        tail = "\n".join(recent[-25:])
        raise TestenvError(f"building {what} failed:\n{tail}{_hint(tail)}")
    for binary in staging.iterdir():
        binary.replace(out / rename.get(binary.name, binary.name))  # atomic: a half-built binary is never visible
    staging.rmdir()
    _log(f"built {what} in {time.monotonic() - started:.0f}s")


def build(versions: Versions) -> Path:
    out = bin_dir(versions)
    missing = missing_binaries(versions)
    if not missing:
        _log(f"control plane cached in {out}")
        return out
    env = go_env()
    out.mkdir(parents=True, exist_ok=True)
    _log(f"building {', '.join(missing)} into {out}")
    if any(binary in missing for binary in KUBERNETES_BINARIES):
        directory = _check_lockfile("kubernetes", "k8s.io/kubernetes", versions.kubernetes)
        packages = [f"k8s.io/kubernetes/cmd/{binary}" for binary in KUBERNETES_BINARIES if binary in missing]
        _build(
            directory=directory,
            packages=packages,
            out=out,
            ldflags=_ldflags_kubernetes(versions.kubernetes),
            env=env,
            what=f"kubernetes {versions.kubernetes}",
        )
    if "etcd" in missing:
        directory = _check_lockfile("etcd", "go.etcd.io/etcd/server/v3", versions.etcd)
        _build(
            directory=directory,
            packages=["go.etcd.io/etcd/server/v3"],
            out=out,
            ldflags="-s -w",
            env=env,
            what=f"etcd {versions.etcd}",
            rename={"server": "etcd"},  # `go build` names it after the module path, minus the major version
        )
    if "kwok" in missing:
        directory = _check_lockfile("kwok", "sigs.k8s.io/kwok", versions.kwok)
        _build(
            directory=directory,
            packages=["sigs.k8s.io/kwok/cmd/kwok"],
            out=out,
            ldflags="-s -w",
            env=env,
            what=f"kwok {versions.kwok}",
        )
    for binary in ALL_BINARIES:
        _log(f"  {binary}: {_version_line(out / binary)}")
    return out


def _version_line(binary: Path) -> str:
    flag = {"etcd": "--version", "kwok": "--version", "kubectl": "version --client"}.get(binary.name, "--version")
    proc = subprocess.run([str(binary), *flag.split()], capture_output=True, text=True, timeout=30, check=False)
    return (proc.stdout or proc.stderr).strip().splitlines()[0] if (proc.stdout or proc.stderr) else "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.testenv.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", default="build", choices=["build", "update", "path", "versions"])
    args = parser.parse_args(argv)
    try:
        versions = load_versions()
        if args.command == "update":
            update(versions)
        elif args.command == "path":
            print(bin_dir(versions))
        elif args.command == "versions":
            print(json.dumps(vars(versions)))
        else:
            build(versions)
    except TestenvError as exc:
        print(f"testenv: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
