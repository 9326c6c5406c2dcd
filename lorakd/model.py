"""Model: a backbone with adapters built for training, and a trained run's model saved and loaded."""
from __future__ import annotations

import warnings
from pathlib import Path

from .backbones import check_attention, load_error, quiet_transformers, resolve_backbone, safe_kwargs
from .budget import attach_adapters
from .errors import UserError
from .graphs import attention, graph_safe
from .errors import first_line
from .trust import check_folder

def build(mcfg, num_labels: int):
    """Backbone with pretrained weights (fp32) and adapters attached."""
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForSequenceClassification

    quiet_transformers()
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
        raise UserError(f"model.attention {mcfg.attention}: {first_line(e, 200)}; use auto") from None
    base = graph_safe(base.float())  # a bf16 checkpoint trains its adapters in fp32; frozen weights cast later
    return attach_adapters(base, mcfg)


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
        raise UserError(f"{out_dir}: cannot write ({first_line(e)})") from None


def load_trained(cfg, run_dir: Path, num_labels: int):
    """The model a run folder holds: its backbone plus adapter/ (or model/ for a full fine-tune)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForSequenceClassification

    quiet_transformers()
    run_dir = Path(run_dir)
    if not cfg.model.full_finetune:  # LoRA: the backbone plus adapter/
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
    src = run_dir / "model"
    if not (src / "config.json").exists():
        raise UserError(f"{run_dir}: no trained model in model/ (did training finish?)")
    try:
        return graph_safe(AutoModelForSequenceClassification.from_pretrained(src, **safe_kwargs(src)).float())
    except (OSError, SafetensorError) as e:
        raise load_error("run", str(run_dir), "weights", e) from None
