from __future__ import annotations

import subprocess
import sys
from importlib.metadata import EntryPoint

import pytest

from kvc.sources import registry as registry_module
from kvc.sources.nfs import NFSSource
from kvc.sources.pvc import PVCSource


def test_installed_source_types_are_found_through_entry_points() -> None:
    loaded = registry_module.load_registry()
    assert isinstance(loaded.get("NFS"), NFSSource)
    assert isinstance(loaded.get("PVC"), PVCSource)
    assert loaded.get("nfs") is None  # sourceType is case-sensitive, as in the API


def test_unknown_type_message_lists_the_known_types() -> None:
    loaded = registry_module.load_registry()
    message = loaded.unknown_message("Ceph")
    assert message.startswith("unknown sourceType 'Ceph': known types are ")
    assert "NFS" in message
    assert "PVC" in message


def test_a_broken_plugin_is_reported_not_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    points = [
        EntryPoint(name="NFS", value="kvc.sources.nfs:NFSSource", group="test"),
        EntryPoint(name="Broken", value="kvc.sources.does_not_exist:Source", group="test"),
        EntryPoint(name="NotASource", value="kvc.sources.base:VolumeManagerRef", group="test"),
    ]
    monkeypatch.setattr(registry_module, "entry_points", lambda group: points)
    loaded = registry_module.load_registry("test")
    assert set(loaded.sources) == {"NFS"}
    assert "ModuleNotFoundError" in loaded.unknown_message("Broken")
    assert loaded.unknown_message("Broken").startswith("sourceType Broken is installed but failed to load")
    assert "NotASource" in loaded.broken


def test_the_controller_and_webhook_load_every_source_type_without_the_s3_client() -> None:
    # boto3 is 7 MB of every process that imports it; only the agents fetch from S3.
    code = (
        "import sys, kvc.controller.handlers, webhook.server\n"
        "from kvc.sources.registry import load_registry\n"
        "assert 'S3' in load_registry().sources\n"
        "print(sorted(m for m in ('boto3', 'botocore') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
