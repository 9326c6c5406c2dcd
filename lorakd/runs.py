"""Run folders: read what a run wrote, refuse foreign formats and backbones, reopen its trained model."""
from __future__ import annotations

import json
from pathlib import Path

from . import RUN_FORMAT
from . import config as config_lib
from . import model as model_lib
from .errors import UserError


def read_metrics(run_dir) -> list[dict]:
    """metrics.jsonl records; a torn last line (a kill mid-write) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    out = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def load_run(run_dir):
    """(config, run.json) of a run folder, refusing foreign or newer formats."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run folder")
    if not (run_dir / "run.json").exists() or not (run_dir / "config.yaml").exists():
        raise UserError(f"{run_dir}: not a lorakd run folder (no run.json/config.yaml)")
    try:
        info = json.loads((run_dir / "run.json").read_text())
    except json.JSONDecodeError:
        raise UserError(f"{run_dir}/run.json: not valid JSON") from None
    if not isinstance(info, dict) or not isinstance(info.get("format"), int):
        raise UserError(f"{run_dir}/run.json: no run format number; not a lorakd run folder")
    if info["format"] > RUN_FORMAT:
        raise UserError(f"{run_dir}: written by a newer lorakd (run format {info['format']}, this one reads "
                        f"up to {RUN_FORMAT}); upgrade lorakd")
    return config_lib.from_dict(config_lib.read_yaml(run_dir / "config.yaml")), info


def with_backbone(cfg, info, backbone=None):
    """The run's config, its backbone optionally swapped for an equal copy (a local folder, say).
    A backbone of another architecture than the one the adapter was trained on is refused."""
    if backbone:
        cfg = config_lib.override(cfg, **{"model.backbone": backbone})
    found = model_lib.backbone_fingerprint(model_lib.backbone_config(cfg.model.backbone, len(cfg.data.label_names)))
    if info.get("backbone_fingerprint") and found != info["backbone_fingerprint"]:
        raise UserError(f"backbone {cfg.model.backbone} is not the one this run was trained on "
                        f"({info.get('backbone')}): its architecture differs")
    return cfg


def open_trained(run_dir, device, backbone=None):
    """(config, info, model on device in eval mode, tokenizer) of a finished run."""
    cfg, info = load_run(run_dir)
    cfg = with_backbone(cfg, info, backbone)
    model = model_lib.load_trained(cfg, run_dir, len(cfg.data.label_names))
    return cfg, info, model.to(device).eval(), model_lib.load_tokenizer(cfg.model.backbone)
