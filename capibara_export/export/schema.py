"""The manifest's JSON Schema (capibara_export/data/manifest.schema.json), shipped in every
bundle beside the format's documentation, and checked on every manifest read or written."""

from __future__ import annotations

import json
import shutil
from functools import lru_cache
from importlib import resources
from pathlib import Path

SCHEMA_FILE = "manifest.schema.json"
DOC_FILE = "ARTIFACTS.md"
_DOC_SOURCE = Path(__file__).resolve().parents[2] / "docs" / "artifacts.md"


@lru_cache(maxsize=1)
def schema() -> dict:
    return json.loads(resources.files("capibara_export").joinpath("data", SCHEMA_FILE).read_text())


def validate(manifest: dict) -> str | None:
    """None when the manifest matches the schema, else where and how it does not."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema(), format_checker=jsonschema.FormatChecker())
    error = next(iter(sorted(validator.iter_errors(manifest), key=lambda e: list(e.absolute_path))), None)
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
    return f"does not match {SCHEMA_FILE} at {where}: {error.message[:200]}"


def write_documents(bundle: Path) -> None:
    """The schema and the format's documentation, inside the bundle."""
    (Path(bundle) / SCHEMA_FILE).write_text(json.dumps(schema(), indent=1))
    if _DOC_SOURCE.is_file():  # the repository's docs (an editable or source install)
        shutil.copyfile(_DOC_SOURCE, Path(bundle) / DOC_FILE)
