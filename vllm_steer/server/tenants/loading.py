"""Reading a tenants file: YAML (or ``.json``) that refuses repeated keys, then the schema."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from vllm_steer.core.errors import field_and_message
from vllm_steer.server.tenants.errors import TenantsFileError
from vllm_steer.server.tenants.schema import TenantsFile

__all__ = ["read_document", "load_tenants_file"]


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a repeated key: a second ``standard:`` tier must not silently win."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict:
    loader.flatten_mapping(node)
    pairs = loader.construct_pairs(node, deep=True)
    seen = set()
    for (key, _), (key_node, _) in zip(pairs, node.value, strict=True):
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return dict(pairs)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _json_unique(pairs: list[tuple[str, Any]]) -> dict:
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise ValueError(f"duplicate key {repeated[0]!r}")
    return dict(pairs)


def read_document(path: Path) -> Any:
    """The parsed YAML/JSON of a tenants file; :class:`TenantsFileError` when missing or not parseable."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise TenantsFileError(path, "<file>", "not found") from None
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text, object_pairs_hook=_json_unique)
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except (yaml.YAMLError, ValueError) as exc:
        raise TenantsFileError(path, "<syntax>", str(exc)) from None


def load_tenants_file(data: Any, source: Path | str = "<mapping>") -> TenantsFile:
    """Validate a parsed tenants document; raise :class:`TenantsFileError` naming the field path."""
    if not isinstance(data, Mapping):
        raise TenantsFileError(source, "<root>", "a tenants file is a mapping with format_version, tiers and tenants")
    try:
        return TenantsFile.model_validate(data)
    except ValidationError as exc:
        raise TenantsFileError(source, *field_and_message(exc, count_more=True)) from None
