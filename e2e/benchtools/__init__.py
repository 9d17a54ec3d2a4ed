"""Third-party tools the benchmarks compare with or drive, built from their Go modules.

``go.mod``/``go.sum`` here pin them (the ``tool`` directives); binaries are cached next to
the control plane's, keyed by a hash of those two files, so a pin change rebuilds them and
nothing else. Refresh the pins with ``go get -tool <module>@<version>`` in this directory.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from e2e.testenv import build

HERE = Path(__file__).resolve().parent


def _pins() -> dict[str, str]:
    """Binary name -> Go package, from the go.mod ``tool`` directives."""
    text = (HERE / "go.mod").read_text()
    block = re.search(r"^tool \((.*?)^\)", text, flags=re.MULTILINE | re.DOTALL)
    tools = re.findall(r"^tool\s+([^\s(]\S*)$", text, flags=re.MULTILINE) + (block.group(1).split() if block else [])
    return {_command_name(package): package for package in tools}


def _command_name(package: str) -> str:
    """The name ``go build`` gives a package's binary: its last element, or the one before a /vN suffix."""
    parts = package.rstrip("/").split("/")
    return parts[-2] if re.fullmatch(r"v[0-9]+", parts[-1]) and len(parts) > 1 else parts[-1]


def binary(name: str) -> Path:
    """The path of a pinned tool, built (once) when it is not cached yet."""
    packages = _pins()
    if name not in packages:
        raise build.TestenvError(f"{name} is not pinned in {HERE / 'go.mod'} (pinned: {', '.join(sorted(packages))})")
    digest = hashlib.sha256((HERE / "go.mod").read_bytes() + (HERE / "go.sum").read_bytes()).hexdigest()[:12]
    directory = build.cache_root() / f"benchtools-{digest}"
    target = directory / name
    if not target.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        staging = directory / f".{name}.{os.getpid()}"
        print(f"[benchtools] building {name} from {packages[name]} (once)", flush=True)
        build.run_go(["go", "build", "-o", str(staging), packages[name]], HERE, build.go_env(), f"building {name}")
        staging.rename(target)
    return target
