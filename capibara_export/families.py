"""The model families the pipeline knows: the built-in ones, and a user's from `--model-module`.

The one module of the pipeline that imports the project's models: everything else reads a
model through its `ModelFamily` (modelapi/family.py), found here by name, by preset, by
the config it made, or by a build or bundle's recorded model.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

from modelapi.errors import UserError
from modelapi.family import ModelFamily

from model.family import FAMILY as BLIP
from model.gpt2.family import FAMILY as GPT2
from sharding.plans import add_axes

DEFAULT = BLIP
_BUILTIN: tuple[ModelFamily, ...] = (BLIP, GPT2)
_registered: dict[str, ModelFamily] = {f.name: f for f in _BUILTIN}
_modules: dict[str, str] = {}          # family name → the --model-module it came from
MODULE_SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
# model and preset names become parts of folder names; entry names of unit ids (ENTRY-PLAN-...), so no '-'
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")
ENTRY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


class FamilyError(UserError):
    """A model family that cannot be found or loaded."""


def register(family: ModelFamily, module: str | None = None) -> ModelFamily:
    """Make `family` known by name, preset and config class; `module` is where it was loaded from."""
    if not isinstance(family, ModelFamily):
        raise FamilyError(f"{module or family!r} is a {type(family).__name__}, not a modelapi.family.ModelFamily; "
                          "see docs/models.md")
    names = [("model name", family.name, NAME), *(("entry", e.name, ENTRY) for e in family.entries),
             *(("preset", p, NAME) for p in family.presets)]
    bad = next(((what, n, rule) for what, n, rule in names if not isinstance(n, str) or not rule.fullmatch(n)), None)
    if bad is not None:
        allowed = "letters, digits and '_'" + (" or '-'" if bad[2] is NAME else "")
        raise FamilyError(f"{module or family.name}: {bad[0]} {bad[1]!r} must be {allowed} (at most 64, not "
                          "starting with a digit): it becomes part of file names")
    known = _registered.get(family.name)
    if known is not None and known is not family:
        raise FamilyError(f"model {family.name!r} from {module} has the name of a model already known "
                          f"({_modules.get(family.name, 'built in')}); give it another name")
    _registered[family.name] = family
    add_axes(family.logical_axes)
    if module:
        _modules[family.name] = module
    return family


def load_module(spec: str) -> ModelFamily:
    """The family at `package.module:ATTR` (importable from sys.path or the current folder)."""
    if not MODULE_SPEC.fullmatch(spec or ""):
        raise FamilyError(f"--model-module {spec!r}: write it as package.module:ATTR, ATTR a ModelFamily")
    module_name, attr = spec.split(":")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise FamilyError(f"--model-module {spec}: cannot import {module_name} ({err}); run from the folder "
                          "that holds it or put it on PYTHONPATH") from None
    if not hasattr(module, attr):
        raise FamilyError(f"--model-module {spec}: {module_name} has no attribute {attr}")
    return register(getattr(module, attr), spec)


def get(name: str) -> ModelFamily:
    try:
        return _registered[name]
    except KeyError:
        raise FamilyError(f"unknown model family {name!r}; known: {', '.join(sorted(_registered))} "
                          "(a model of your own: --model-module package.module:ATTR)") from None


def module_of(family: ModelFamily) -> str | None:
    """The --model-module a user's family came from (None for a built-in one)."""
    return _modules.get(family.name)


def for_config(config) -> ModelFamily:
    """The family whose config class `config` is."""
    for family in _registered.values():
        if isinstance(config, family.config_type):
            return family
    raise FamilyError(f"no known model family makes a {type(config).__name__} config; "
                      "load its module with --model-module")


def for_preset(name: str) -> ModelFamily:
    """The family that has a preset `name`."""
    for family in _registered.values():
        if name in family.presets:
            return family
    presets = sorted(p for f in _registered.values() for p in f.presets)
    raise FamilyError(f"unknown model preset {name!r}; choose one of {presets}")


def for_checkpoint(folder: str | Path) -> ModelFamily:
    """The family of a Hugging Face checkpoint folder, by its config.json's `model_type`."""
    path = Path(folder) / "config.json"
    try:
        model_type = json.loads(path.read_text()).get("model_type", "")
    except (OSError, ValueError, AttributeError):
        return DEFAULT     # the family's own loader reports the missing or unreadable config
    for family in _registered.values():
        if family.checkpoint_config and model_type.startswith(family.name):
            return family
    return DEFAULT


def for_record(model: dict) -> ModelFamily:
    """The family a build's or bundle's recorded model names (`family`, `module`); BLIP when
    it names none (folders written before families were recorded)."""
    name = model.get("family", DEFAULT.name)
    if name not in _registered and model.get("module"):
        load_module(model["module"])
    return get(name)


def config_from_record(model: dict):
    """The config a build's or bundle's `model` record holds, made by its family."""
    return for_record(model).config_from_dict(model["config"])


def builtin() -> tuple[ModelFamily, ...]:
    return _BUILTIN
