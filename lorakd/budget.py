"""Adapters and the budget: LoRA through peft, what counts as the head, exact parameter counts on the meta
device, whether the budget applies, and fit-budget (the adapter placements that fill a budget)."""
from __future__ import annotations

import itertools
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass, replace

import torch

from .backbones import EMBEDDED, backbone_config, quiet_transformers
from .config import ModelConfig
from .errors import UserError, first_line

HEAD_NAMES = ("classifier", "score")


def is_head(name: str) -> bool:
    """A module or parameter of the classification head, which trains whole beside the adapters."""
    return any(part in HEAD_NAMES for part in name.split("."))


def budget_applies(cfg) -> bool:
    """The budget binds a student's adapters; a teacher, a budget of 0 or a full fine-tune is not bound."""
    return cfg.role == "student" and cfg.model.budget > 0 and not cfg.model.full_finetune


def over_budget(cfg, trainable: int) -> bool:
    return budget_applies(cfg) and trainable > cfg.model.budget


def check_budget(cfg, counts):
    """The over-budget error, raised before anything trains."""
    if over_budget(cfg, counts["trainable"]):
        m = cfg.model
        raise UserError(f"{counts['trainable']:,} trainable parameters exceed the budget of {m.budget:,} "
                        f"(model.r={m.r}, model.targets={','.join(m.targets)}, "
                        f"model.layers={','.join(map(str, m.layers)) or 'all'}); lower r, drop targets or "
                        f"layers, or raise model.budget")


# ---------------------------------------------------------------- adapters

def linear_names(model) -> set[str]:
    """The linear modules an adapter may go on: every one outside the head."""
    return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not is_head(n)}


def check_targets(targets, names, key="model.targets", where="this backbone"):
    """Each target names a linear module (as peft matches a name: equal, or its dotted end)."""
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in names):
            suffixes = sorted({n.split(".")[-1] for n in names})
            raise UserError(f"{key}: no linear module named {t!r} in {where} "
                            f"(names: {', '.join(suffixes)}; dotted paths like attention.output.dense work)")


def _check_placement(model, mcfg):
    """Unknown targets or layers are the user's mistake: say which, and what exists."""
    n_layers = model.config.num_hidden_layers
    bad_layers = [layer for layer in mcfg.layers if layer >= n_layers]
    if bad_layers:
        raise UserError(f"model.layers: layer {bad_layers[0]} is out of range (this backbone has layers "
                        f"0..{n_layers - 1})")
    check_targets(mcfg.targets, linear_names(model))


def lora_config(mcfg, heads=()):
    """peft's LoraConfig for a model config; `heads`: the head's module names, which get no adapter."""
    from peft import LoraConfig

    return LoraConfig(task_type="SEQ_CLS", r=mcfg.r, lora_alpha=mcfg.alpha, lora_dropout=mcfg.dropout,
                      target_modules=list(mcfg.targets), layers_to_transform=list(mcfg.layers) or None,
                      exclude_modules=list(heads) or None)


def attach_adapters(model, mcfg):
    """LoRA adapters + trainable head through peft, or every weight trainable for a full fine-tune."""
    if mcfg.full_finetune:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import get_peft_model

    _check_placement(model, mcfg)
    heads = sorted(n for n, _ in model.named_modules() if n and is_head(n))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return get_peft_model(model, lora_config(mcfg, heads))
        except ValueError as e:
            raise UserError(f"model.targets / model.layers: peft refused the placement "
                            f"({first_line(e, 200)})") from None


# ---------------------------------------------------------------- exact counts

def meta_backbone(backbone: str, num_labels: int):
    """The backbone with its classification head on the meta device: every shape, no weights."""
    from transformers import AutoModelForSequenceClassification

    quiet_transformers()
    hf_config = backbone_config(backbone, num_labels)
    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(hf_config)


def count_params(mcfg, num_labels: int) -> dict:
    """Exact trainable/total counts and a per-module breakdown, built on the meta device: no weights."""
    base = meta_backbone(mcfg.backbone, num_labels)
    with torch.device("meta"):
        model = attach_adapters(base, mcfg)
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
            key = "head" if is_head(name) else name.split(".")[-2] if "." in name else name
            group = groups.setdefault(key, [set(), 0])
        group[1] += p.numel()
    breakdown = [{"module": k, "layers": len(v[0]) if k.startswith("lora") else None, "params": v[1]}
                 for k, v in groups.items()]
    return {"trainable": trainable, "total": total, "breakdown": breakdown}


# ---------------------------------------------------------------- fit-budget

@dataclass
class Placements:
    """What peft does with each target on one backbone, asked once on the meta device."""
    wraps: dict  # (target, layer index or None for every layer): the modules peft wraps
    per_r: dict  # module: its LoRA parameters per unit of rank
    sides: dict  # module: its smallest side (the most rank a LoRA pair can add there)
    head: int  # the head's parameters
    n_layers: int


def placements(backbone: str, targets, num_labels: int) -> Placements:
    """Adapters of rank 1 on every target, built by peft on the meta device (as count_params builds them): each
    wrapped module's count, then peft's own target matching for each (target, layer), to combine cheaply."""
    from peft.tuners.tuners_utils import check_target_module_exists

    base = meta_backbone(backbone, num_labels)
    names = linear_names(base)
    check_targets(targets, names, "--targets", backbone)
    sides = {n: min(m.in_features, m.out_features) for n, m in base.named_modules() if n in names}
    mcfg = ModelConfig(backbone=backbone, r=1, targets=tuple(targets), layers=())
    n_layers = base.config.num_hidden_layers
    with torch.device("meta"):
        model = attach_adapters(base, mcfg)
    per_r, head = {}, 0
    for name, p in model.named_parameters():
        if ".lora_" in name:
            module = name.split(".lora_")[0].removeprefix("base_model.model.")
            per_r[module] = per_r.get(module, 0) + p.numel()
        elif p.requires_grad:
            head += p.numel()
    wraps = {}
    for t in targets:
        for layer in (None, *range(n_layers)):
            asked = lora_config(replace(mcfg, targets=(t,), layers=() if layer is None else (layer,)))
            wraps[t, layer] = frozenset(n for n in per_r if check_target_module_exists(asked, n))
    return Placements(wraps, per_r, sides, head, n_layers)


def lora_cost(found: Placements, targets, layers=()) -> tuple[int, frozenset]:
    """(parameters per unit of rank, modules wrapped) of adapters on `targets` in `layers` (every layer when
    none are given)."""
    hit = frozenset().union(*(found.wraps[t, layer] for t in targets for layer in (layers or (None,))))
    return sum(found.per_r[n] for n in hit), hit


def layer_sets(n: int) -> list[tuple[str, tuple]]:
    """A few layer placements: all, each half, every other, the first and last few; no two alike."""
    half, k = n // 2, max(1, n // 6)
    cands = [("all", ()), ("bottom half", tuple(range(half))), ("top half", tuple(range(n - half, n))),
             ("every other", tuple(range(0, n, 2))), (f"first+last {k}", tuple(range(k)) + tuple(range(n - k, n)))]
    out, seen = [], set()
    for label, layers in cands:
        key = frozenset(layers or range(n))  # an empty half (one layer) counts as all: dropped
        if key not in seen:
            seen.add(key)
            out.append((label, layers))
    return out


def propose(budget: int, backbone: str, targets, num_labels=4, min_r=1, max_r=None) -> list[dict]:
    """Every placement (target subset x layer set) at the largest rank that fits (capped at max_r when
    given, and at the smallest wrapped matrix's own rank: beyond it LoRA adds parameters, not capacity),
    most parameters first; among equals, more modules at a lower rank first."""
    found = placements(backbone, targets, num_labels)
    if found.head >= budget:
        raise UserError(f"--budget {budget:,}: the classification head alone has {found.head:,} parameters")
    out, seen = [], set()
    subsets = [s for k in range(1, len(targets) + 1) for s in itertools.combinations(targets, k)]
    for label, layers in layer_sets(found.n_layers):
        for subset in subsets:
            per_r, hit = lora_cost(found, subset, layers)
            if not hit or hit in seen:  # e.g. dense already covers output.dense: same modules, same count
                continue
            seen.add(hit)
            r = min((budget - found.head) // per_r, min(found.sides[n] for n in hit))
            r = r if max_r is None else min(r, max_r)
            if r >= min_r:
                out.append({"r": r, "targets": subset, "layers": layers, "layer_set": label, "modules": len(hit),
                            "trainable": found.head + r * per_r})
    out.sort(key=lambda p: (-p["trainable"], -p["modules"], len(p["targets"])))
    return out


def _layers_text(p) -> str:
    return f"{p['layer_set']} ({','.join(map(str, p['layers']))})" if p["layers"] else "all"


def fit_budget(budget=1_000_000, backbone=EMBEDDED, targets="query,key,value,dense", num_labels=4, top=15, min_r=1,
               max_r=None) -> list[dict]:
    """Print the placements that use the budget best, and return them (sweep.write_fit_sweep writes them)."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    targets = list(dict.fromkeys(targets))
    for ok, msg in ((budget >= 1, f"--budget {budget}: must be positive"), (bool(targets), "--targets: empty"),
                    (num_labels >= 2, f"--labels {num_labels}: needs at least 2"),
                    (top >= 1, f"--top {top}: must be at least 1"), (min_r >= 1, f"--min-r {min_r}: must be >= 1"),
                    (max_r is None or max_r >= min_r, f"--max-r {max_r}: must be >= --min-r {min_r}")):
        if not ok:
            raise UserError(msg)
    props = propose(budget, backbone, targets, num_labels, min_r, max_r)[:top]
    if not props:
        raise UserError(f"no placement of {','.join(targets)} fits {budget:,} parameters at rank >= {min_r}")
    print(f"{backbone}, {num_labels} labels, budget {budget:,}: the {len(props)} placements with most parameters")
    tw = max(7, *(len(",".join(p["targets"])) for p in props))
    lw = max(6, *(len(_layers_text(p)) for p in props))
    print(f"{'r':>4}  {'targets':<{tw}}  {'layers':<{lw}}  {'modules':>7}  {'trainable':>11}  {'% budget':>8}")
    for p in props:
        print(f"{p['r']:>4}  {','.join(p['targets']):<{tw}}  {_layers_text(p):<{lw}}  {p['modules']:>7}  "
              f"{p['trainable']:>11,}  {100 * p['trainable'] / budget:>7.2f}%")
    return props
