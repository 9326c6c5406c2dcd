"""YAML files: read with care (only true/false are booleans, aliases counted against a cap, a one-line error that
names the file), and the ones the package ships (presets/, sweeps/) found by name."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from .errors import UserError

PRESETS = Path(__file__).resolve().parent / "presets"  # shipped inside the package (pyproject package-data)

MAX_YAML_NODES = 100_000  # values a config or sweep file may hold once its aliases are expanded


class Loader(yaml.SafeLoader):
    """YAML with only true/false as booleans (as YAML 1.2): `on`, `off`, `yes`, `no` stay text, so
    train.cuda_graphs: on means "on"; a bool key still takes them (see config._coerce).

    Aliases (*name) are read, but what they expand to is counted: a few lines of nested aliases (a "billion
    laughs") would otherwise become gigabytes once the values are checked, copied or shown in a message."""

    def compose_document(self):
        node = super().compose_document()
        _expanded_size(node)
        return node


def _expanded_size(root) -> int:
    """The number of values a YAML node holds with every alias expanded; past MAX_YAML_NODES, or a value
    that holds itself, a YAMLError. Each node is counted once (memo), so this is quick whatever the total."""
    def children(node):
        return [] if isinstance(node, yaml.ScalarNode) else [
            n for item in node.value for n in (item if isinstance(item, tuple) else (item,))]

    sizes, on_path, stack = {}, set(), [(root, False)]
    while stack:
        node, done = stack.pop()
        if done:
            on_path.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children(node))
            if sizes[id(node)] > MAX_YAML_NODES:
                raise yaml.YAMLError(f"aliases expand past {MAX_YAML_NODES:,} values")
        elif id(node) in on_path:
            raise yaml.YAMLError("an alias inside the value it names")
        elif id(node) not in sizes:
            on_path.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in children(node))
    return sizes[id(root)]


Loader.yaml_implicit_resolvers = {c: [(tag, rx) for tag, rx in rs if tag != "tag:yaml.org,2002:bool"]
                                  for c, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()}
Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                             list("tTfF"))


def read_yaml(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such config file")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, expected a YAML config file")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except RecursionError:
        raise UserError(f"{path}: not valid YAML (nested too deeply)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = (str(getattr(e, "problem", None) or e).splitlines() or [""])[0]
        raise UserError(f"{path}:{where} not valid YAML ({problem})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of config keys at the top")
    return raw


def shipped_file(folder: Path, name_or_path) -> Path | None:
    """A file the user names, else one shipped in the package's `folder` by name (with or without .yaml),
    also as `presets/NAME.yaml` (the checkout's path before presets/ and sweeps/ moved into the package)."""
    p = Path(name_or_path)
    if p.exists():
        return p
    names = [str(name_or_path), f"{name_or_path}.yaml"] + ([p.name] if p.parent == Path(folder.name) else [])
    return next((folder / n for n in names if (folder / n).is_file()), None)


def preset_path(name_or_path: str) -> Path:
    """A config file path, or the name of a preset in lorakd/presets (with or without .yaml)."""
    found = shipped_file(PRESETS, name_or_path)
    if found:
        return found
    known = ", ".join(sorted(f.stem for f in PRESETS.glob("*.yaml")))
    raise UserError(f"{name_or_path}: no such config file or preset (presets: {known})")
