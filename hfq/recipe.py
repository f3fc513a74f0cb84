"""Configs from the command line (`--method NAME --set k=v`) and from YAML recipes (`method:` + `config:`)."""
from __future__ import annotations

from pathlib import Path

import yaml

from .integration import METHODS, HfqConfig


def method_name(name: str) -> str:
    full = name if name.startswith("hfq_") else f"hfq_{name}"
    if full not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(m[4:] for m in sorted(METHODS))}")
    return full


def parse_sets(pairs: list[str] | None) -> dict:
    """["bits=4", "group_size=null", "modules_to_not_convert=[lm_head]"] -> typed values (YAML scalars)."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def build_config(method: str, overrides: dict | None = None) -> HfqConfig:
    config_cls = METHODS[method_name(method)][0]
    return config_cls(**(overrides or {}))


def load_recipe(path: str | Path, overrides: dict | None = None) -> HfqConfig:
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict) or "method" not in data:
        raise ValueError(f"recipe {path} must be a mapping with a 'method' key and an optional 'config' mapping")
    unknown = set(data) - {"method", "config", "description"}
    if unknown:
        raise ValueError(f"recipe {path}: unknown keys {sorted(unknown)} (allowed: method, config, description)")
    return build_config(data["method"], {**(data.get("config") or {}), **(overrides or {})})
