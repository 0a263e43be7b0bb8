"""Every config key acts: the package reads each one where its section is read (or the key is
listed here as documentation-only, with the reason), and a key that was removed is an error
that says what to use instead. A key accepted and then ignored changes nothing for the user who
sets it (rl.filter_metric and rollout.val_temperature / val_top_p once were)."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from memagent_jax.config import Config, load_config

PACKAGE = Path(__file__).resolve().parent.parent / "memagent_jax"

#: Keys no code reads on purpose: key -> why. Keep it empty unless a key only documents a run.
DOC_ONLY: dict[str, str] = {}


def _keys(cls: type, prefix: str = "") -> list[str]:
    """Dotted leaf keys of a config dataclass (sections recurse)."""
    out = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out += _keys(type(default), f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def _reads_per_module() -> dict[str, tuple[set[str], set[str]]]:
    """Module path -> (attribute names it reads (x.name), every identifier it uses: names,
    attributes, parameters), config.py itself left out."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name != "config.py":
            nodes = list(ast.walk(ast.parse(path.read_text(encoding="utf-8"))))
            attrs = {n.attr for n in nodes if isinstance(n, ast.Attribute)}
            names = {n.id for n in nodes if isinstance(n, ast.Name)}
            names |= {n.arg for n in nodes if isinstance(n, ast.arg)}
            out[str(path.relative_to(PACKAGE))] = (attrs, attrs | names)
    return out


def test_every_config_key_is_read_where_its_section_is():
    """A key `a.b.c` counts as read when one module reads the attribute `c` and names `b` (its
    innermost section: `cfg.b`, or a variable / parameter called `b`); a top-level key must be
    read as an attribute."""
    modules = _reads_per_module()
    unread = []
    for key in _keys(Config):
        *sections, field = key.split(".")
        read = any(field in attrs and (not sections or sections[-1] in idents)
                   for attrs, idents in modules.values())
        if key not in DOC_ONLY and not read:
            unread.append(key)
    assert not unread, (f"config keys no module reads: {unread}; make them act where they are "
                        "meant to, or remove them (config.REMOVED_KEYS names the replacement)")
    assert not set(DOC_ONLY) - set(_keys(Config)), "DOC_ONLY lists keys the config no longer has"


@pytest.mark.parametrize("key", ["rollout.val_temperature", "rollout.val_top_p"])
def test_removed_keys_are_a_clear_error(key):
    from memagent_jax.config import REMOVED_KEYS

    assert key in REMOVED_KEYS and key not in _keys(Config)
    with pytest.raises(KeyError, match=f"config key '{key}' was removed: use memagent-jax eval"):
        load_config(None, [f"{key}=0.7"])


def test_shipped_configs_set_no_removed_or_unknown_key():
    import yaml

    for path in sorted((PACKAGE.parent / "configs").glob("*.yaml")):
        if "demo" not in (yaml.safe_load(path.read_text()) or {}):  # `demo` reads demo configs
            load_config(path)
