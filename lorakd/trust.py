"""Files from someone else, opened without trusting them: a JSON object read in one line's error, a model
folder that asks for no code. No torch or transformers here: ONNX prediction uses it without importing them."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError, brief


def read_json(path) -> dict:
    """A JSON object from a file lorakd wrote; anything else is a one-line error naming the file."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path}: not valid JSON") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object")
    return obj


# attention implementations built into transformers; any other name (a hub kernel, "org/repo") is code fetched
# and run at load
BUILTIN_ATTENTION = (None, "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
ATTENTION_KEYS = ("attn_implementation", "_attn_implementation", "_attn_implementation_internal")
FOLDER_FILES = ("config.json", "tokenizer_config.json", "adapter_config.json", "lorakd.json")


def remote_code(obj, where) -> str | None:
    """What in a model folder's JSON (nested configs too) would run code from elsewhere, in words; None when
    nothing would."""
    stack = [obj]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        if not isinstance(node, dict):
            continue
        if "auto_map" in node:
            return f"{where} asks for code of its own (auto_map)"
        for key in ATTENTION_KEYS:
            values = node.get(key)
            for v in values.values() if isinstance(values, dict) else [values]:
                if v not in BUILTIN_ATTENTION:
                    return f"{where} names attention {brief(v)}, a kernel fetched from the hub"
        stack.extend(node.values())
    return None


def check_folder(src) -> str:
    """src, once a local model folder's JSON files ask for no code from outside transformers: a config.json with
    auto_map (a .py of the folder's own) or an attention kernel from the hub is refused before anything loads.
    Every from_pretrained also passes trust_remote_code=False (safe_kwargs), so a hub id never runs code and
    transformers never asks on stdin."""
    folder = Path(src)
    for name in FOLDER_FILES if folder.is_dir() else ():
        f = folder / name
        if not f.is_file():
            continue
        if f.stat().st_size > 64 << 20:
            raise UserError(f"{f}: {f.stat().st_size:,} bytes; a model folder's JSON file over 64 MB is refused")
        try:
            obj = json.loads(f.read_bytes())
        except (ValueError, RecursionError):
            raise UserError(f"{f}: not valid JSON") from None
        why = remote_code(obj, f)
        if why:
            raise UserError(f"{why}; lorakd runs no code from a model folder (trust_remote_code is off)")
    return str(src)


