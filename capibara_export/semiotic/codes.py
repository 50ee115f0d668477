"""The catalogue of cultural and artistic codes (data/cultural_codes.toml, user-extensible)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from modelapi.errors import UserError

SHIPPED = Path(__file__).resolve().parent.parent / "data" / "cultural_codes.toml"


class CodesError(UserError):
    pass


@dataclass(frozen=True)
class Code:
    category: str
    name: str
    prompt: str
    meaning: str = ""


def load_codes(source: str | Path | list[str] | None = None) -> list[Code]:
    """The shipped catalogue, a TOML file of the same form, or a list of names from the
    shipped catalogue to restrict it to."""
    if isinstance(source, list):
        codes = load_codes(None)
        unknown = set(source) - {c.name for c in codes}
        if unknown:
            raise CodesError(f"unknown code(s) {sorted(unknown)}; the catalogue is {SHIPPED}")
        return [c for c in codes if c.name in source]
    path = Path(source) if source else SHIPPED
    if not path.is_file():
        raise CodesError(f"{path}: codes file not found")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise CodesError(f"{path}: not valid TOML ({err})") from None
    codes = []
    for category, body in raw.items():
        if not isinstance(body, dict) or "codes" not in body or "template" not in body:
            raise CodesError(f"{path}: [{category}] needs `template` and `codes`")
        if "{name}" not in body["template"]:
            raise CodesError(f"{path}: [{category}] template must contain {{name}}")
        meanings = body.get("meanings", {})
        codes += [Code(category, name, body["template"].format(name=name), meanings.get(name, ""))
                  for name in body["codes"]]
    if not codes:
        raise CodesError(f"{path}: no codes")
    return codes
