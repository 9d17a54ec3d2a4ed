"""Finding source types: every class registered under the ``kvc.sources`` entry point group."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from pydantic import ValidationError

from kvc.api.models import VolumeConfig
from kvc.sources.base import Source

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "kvc.sources"


@dataclass
class SourceRegistry:
    sources: dict[str, Source] = field(default_factory=dict)
    # Plugins that are installed but failed to load, with the reason: shown to users.
    broken: dict[str, str] = field(default_factory=dict)

    def get(self, source_type: str) -> Source | None:
        return self.sources.get(source_type)

    def unknown_message(self, source_type: str) -> str:
        if source_type in self.broken:
            return f"sourceType {source_type} is installed but failed to load: {self.broken[source_type]}"
        known = ", ".join(sorted(self.sources)) or "none"
        return f"unknown sourceType {source_type!r}: known types are {known}"

    def check(self, raw: Mapping[str, Any]) -> tuple[VolumeConfig, Source] | str:
        """A spec's volumeConfig, parsed, with its source type; or, as a message that says what
        to fix, why it can never be provisioned. The controller reports that message as the
        volume's failure, and the webhook refuses with it before the controller has."""
        try:
            config = VolumeConfig.model_validate(raw)
        except ValidationError as exc:
            return f"invalid volumeConfig: {_describe(exc)}"
        source = self.get(config.source_type)
        if source is None:
            return self.unknown_message(config.source_type)
        problems = source.validate(config)
        if problems:
            return "; ".join(problems)
        return config, source


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"])
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


def load_registry(group: str = ENTRY_POINT_GROUP) -> SourceRegistry:
    registry = SourceRegistry()
    for entry_point in entry_points(group=group):
        try:
            source_class = entry_point.load()
            source = source_class()
            if not isinstance(source, Source):
                raise TypeError(f"{entry_point.value} is not a kvc.sources.base.Source")
        except Exception as exc:  # a broken plugin must not take the controller down
            logger.exception("source type %s failed to load", entry_point.name)
            registry.broken[entry_point.name] = f"{type(exc).__name__}: {exc}"
            continue
        registry.sources[entry_point.name] = source
    return registry
