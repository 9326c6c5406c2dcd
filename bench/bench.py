"""GPU benchmark: lorakd vs the stock transformers.Trainer + peft, same recipe and data, side by side.

Run on the lent GPU (one call), from the repo root:
    python bench/bench.py --backbone .device-carry/minilm --data .device-carry/data --out bench/results
Prints a table and writes bench/results/bench[-TAG].json (and a timestamped copy in bench/results/scratch/).
Sections (--only to pick some):
  check    fast path (CUDA graphs) vs plain path: per-step losses on the same batches
  minilm   peer vs lorakd on the embedded MiniLM: reference recipe on the sample (accuracy, speed; one
           run per --seeds), and one epoch of the sample repeated to 120,000 rows (full-split scale)
  accuracy only the per-seed reference runs of `minilm`
  roberta  peer vs lorakd on roberta-base shapes with random weights (speed only)
  levers   each speed lever switched off alone (graphs, length grouping, bf16), at 120k scale
  batch    lorakd at larger batches: fastest time to the peer's accuracy
  predict  `lorakd predict` throughput, adapters merged
  archs    per encoder architecture (small random-weight configs): does the step capture as a CUDA graph,
           graphed and plain samples/s, largest per-step loss difference in fp32 with no dropout
  speed    issue 14's figures in one call (about 6-7 minutes on one H200), side by side with the peer:
           fresh `lorakd train` processes (wall, phases), the peer on the same recipe, MiniLM at 120k scale,
           roberta-base shapes (batch 24, and MFU at 256), the all-mpnet-base-v2 full-FT teacher, archs.
           Writes bench/results/speed-summary.json after every part (a failing part is recorded, the rest
           still run). --parts NAME,... runs some parts and adds them to the file (`--parts levers`: each
           speed lever alone, about 2-3 minutes more). LORAKD_BENCH_TINY=1 shrinks every part to a few
           steps (a CPU smoke test).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import traceback
import math
import os
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lorakd import config as config_lib  # noqa: E402
from lorakd import data as data_lib  # noqa: E402
from lorakd import backbones  # noqa: E402
from lorakd.runs import read_metrics  # noqa: E402
from lorakd.train import train  # noqa: E402
from lorakd.yaml_files import preset_path  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parent))
from result_files import result_paths, write_result  # noqa: E402

FULL_SPLIT = 120_000
REPO = Path(__file__).resolve().parent.parent
TINY = os.environ.get("LORAKD_BENCH_TINY") == "1"  # a few steps everywhere: checks the bench runs, not speed
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops():
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def flops_per_sample(backbone, tokens):
    """Matmul FLOPs of one LoRA training sample: forward 2*N*T plus backward through activations
    2*N*T (frozen weights need no weight gradients), N = non-embedding linear weights, plus attention."""
    cfg = backbones.backbone_config(backbone, 4)
    h, n_layers, inter = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    linear = n_layers * (4 * h * h + 2 * h * inter)
    attention = n_layers * 2 * tokens * h  # QK^T and AV, per token
    return 4 * (linear + attention) * tokens


def reference(backbone, data, **over):
    base = {"name": "bench", "data.path": data, "model.backbone": backbone, "train.log_every": 50,
            "train.checkpoint_every": 0, "train.eval_batch_size": 512}
    base.update(over)
    return config_lib.load(preset_path("agnews-minilm"), [], base)


def peak_mem_reset():
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_mem_gb():
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def mean_tokens(cfg):
    splits = data_lib.load_splits(cfg.data, cfg.train.seed)
    tok = backbones.load_tokenizer(cfg.model.backbone)
    enc = data_lib.encode(tok, splits["train"].texts, cfg.data.max_length)
    return sum(len(e) for e in enc) / len(enc)


# ---------------------------------------------------------------- lorakd

def run_lorakd(cfg, tmp, log=lambda *a, **k: None):
    run_dir = Path(tempfile.mkdtemp(dir=tmp))
    peak_mem_reset()
    t0 = time.perf_counter()
    summary = train(cfg, run_dir, log=log)
    wall = time.perf_counter() - t0
    samples = summary["samples_per_s"] * summary["train_time_s"]
    steady = summary["train_time_s"] - summary["graph_capture_s"]  # what a long run converges to
    return {"samples_per_s": summary["samples_per_s"], "train_time_s": summary["train_time_s"], "wall_s": wall,
            "val_acc": summary.get("validation_accuracy"), "peak_gb": peak_mem_gb(), "steps": summary["steps"],
            "capture_s": summary["graph_capture_s"], "graphs": summary["cuda_graphs"],
            "steady_samples_per_s": samples / steady if steady > 0 else None, "run_dir": str(run_dir)}


# ---------------------------------------------------------------- the peer: Trainer + PEFT

def run_peer(cfg, tmp, max_steps=0, evaluate=True):
    """transformers.Trainer + peft.get_peft_model, the reference recipe, DataCollatorWithPadding, bf16."""
    import inspect

    import numpy as np
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)

    src = backbones.resolve_backbone(cfg.model.backbone)
    tok = AutoTokenizer.from_pretrained(src)
    splits = data_lib.load_splits(cfg.data, cfg.train.seed)

    def records(split):
        enc = tok(split.texts, truncation=True, max_length=cfg.data.max_length)
        return [{"input_ids": i, "attention_mask": m, "labels": int(y)}
                for i, m, y in zip(enc["input_ids"], enc["attention_mask"], split.labels)]

    train_set, val_set = records(splits["train"]), records(splits["validation"])
    torch.manual_seed(cfg.train.seed)
    model = AutoModelForSequenceClassification.from_pretrained(src, num_labels=4)
    m = cfg.model
    if not m.full_finetune:  # a full fine-tune (a teacher) trains the stock model as it is
        model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=m.r, lora_alpha=m.alpha,
                                                 lora_dropout=m.dropout, target_modules=list(m.targets)))
    t = cfg.train
    kwargs = dict(output_dir=str(Path(tmp) / "peer"), per_device_train_batch_size=t.batch_size,
                  per_device_eval_batch_size=t.eval_batch_size, learning_rate=t.lr, num_train_epochs=t.epochs,
                  max_steps=max_steps or -1, weight_decay=t.weight_decay, lr_scheduler_type=t.schedule, bf16=torch.cuda.is_available(),
                  logging_steps=50, save_strategy="no", report_to=[], seed=t.seed, max_grad_norm=t.grad_clip)
    # transformers 5 dropped warmup_ratio: a float warmup_steps is the ratio there.
    if "warmup_ratio" in inspect.signature(TrainingArguments).parameters:
        kwargs["warmup_ratio"] = t.warmup_ratio
    else:
        kwargs["warmup_steps"] = t.warmup_ratio
    trainer = Trainer(model=model, args=TrainingArguments(**kwargs), train_dataset=train_set,
                      data_collator=DataCollatorWithPadding(tok))
    peak_mem_reset()
    t0 = time.perf_counter()
    out = trainer.train()
    wall = time.perf_counter() - t0
    res = {"samples_per_s": out.metrics["train_samples_per_second"], "train_time_s": out.metrics["train_runtime"],
           "wall_s": wall, "peak_gb": peak_mem_gb(), "steps": out.global_step, "val_acc": None}
    if evaluate:
        pred = trainer.predict(val_set)
        res["val_acc"] = float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())
    del trainer, model
    torch.cuda.empty_cache()
    return res


# ---------------------------------------------------------------- sections

def check_fast_path(backbone, data, tmp, steps=60):
    """Same seed, same batches: per-step train loss of the graphed and the plain step, with no dropout anywhere
    in fp32 (where they must agree to float noise) and in bf16, and with the recipe's dropout in fp32 (the
    graphs' warm-ups restore the random state, so both steps draw the same masks)."""
    result = {}
    for arm in ("fp32", "bf16", "fp32 with dropout"):
        precision, dropout = arm.split()[0], {} if "dropout" in arm else {"model.dropout": 0.0,
                                                                           "model.backbone_dropout": 0.0}
        out = {}
        for mode in ("off", "on"):
            cfg = reference(backbone, data, **{"train.max_steps": steps, "train.log_every": 1, **dropout,
                                               "train.cuda_graphs": mode, "train.eval_every": 10_000,
                                               "train.precision": precision})
            r = run_lorakd(cfg, tmp)
            out[mode] = [x["loss"] for x in read_metrics(r["run_dir"]) if x["split"] == "train"]
        diffs = [abs(a - b) for a, b in zip(out["off"], out["on"])]
        result[arm] = {"steps": steps, "max_abs_diff": max(diffs), "mean_abs_diff": sum(diffs) / len(diffs),
                       "first_losses_plain": out["off"][:3], "first_losses_graphed": out["on"][:3],
                       "last_loss_plain": out["off"][-1], "last_loss_graphed": out["on"][-1]}
    return result


LEVERS = {  # each measured alone against the full fast path, at 120k-row scale
    "all levers (graphs, bf16, length buckets, device batches)": {},
    "no CUDA graphs (eager step)": {"train.cuda_graphs": "off"},
    "no length grouping (random batches)": {"data.group_by_length": False},
    "fp32 instead of bf16": {"train.precision": "fp32"},
    "eager attention instead of SDPA": {"model.attention": "eager"},
    "torch.compile (inductor) on": {"train.compile": True},
}


def levers(backbone, data, tmp, steps, names=None):
    """Each lever alone (names: a subset of LEVERS); a lever that fails is recorded, not fatal."""
    n_train = len(data_lib.load_splits(reference(backbone, data).data, 42)["train"])
    rows = {}
    for name, over in LEVERS.items():
        if names and name not in names:
            continue
        cfg = reference(backbone, data, **{"data.repeat": math.ceil(FULL_SPLIT / n_train), "train.max_steps": steps,
                                           **over})
        try:
            rows[name] = run_lorakd(cfg, tmp)
        except Exception as e:  # noqa: BLE001
            rows[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return rows


def full_scale(backbone, data, tmp, batch=24, peer_steps=600):
    """One epoch of the sample repeated to 120,000 rows: lorakd timed whole, the peer over peer_steps."""
    n_train = len(data_lib.load_splits(reference(backbone, data).data, 42)["train"])
    repeat = math.ceil(FULL_SPLIT / n_train)
    steps = FULL_SPLIT // batch
    cfg = reference(backbone, data, **{"data.repeat": repeat, "train.max_steps": steps, "train.batch_size": batch,
                                       "data.val_fraction": 0.05})
    ours = run_lorakd(cfg, tmp)
    peer = run_peer(reference(backbone, data, **{"data.repeat": repeat}), tmp, max_steps=peer_steps, evaluate=False)
    return ours, peer


ARCHS = {  # name: (transformers config class, its size keys, LoRA targets); vocab and widths kept small
    "bert": ("BertConfig", {}, "query,key,value"),
    "roberta": ("RobertaConfig", {"max_position_embeddings": 514}, "query,key,value"),
    "xlm-roberta": ("XLMRobertaConfig", {"max_position_embeddings": 514}, "query,key,value"),
    "electra": ("ElectraConfig", {"embedding_size": 128}, "query,key,value"),
    "mpnet": ("MPNetConfig", {"max_position_embeddings": 514}, "q,k,v"),
    "distilbert": ("DistilBertConfig", {"dim": 128, "n_layers": 2, "n_heads": 4, "hidden_dim": 256}, "q_lin,k_lin,v_lin"),
    "deberta-v2": ("DebertaV2Config", {"relative_attention": True, "pos_att_type": ["p2c", "c2p"],
                                       "position_buckets": 64}, "query_proj,key_proj,value_proj"),
    "modernbert": ("ModernBertConfig", {"global_attn_every_n_layers": 1}, "Wqkv"),
}


def make_arch(tmp, name, tokenizer_src):
    """A 2-layer, 128-wide random-weight model folder of one architecture, with the MiniLM tokenizer."""
    import transformers
    from transformers import AutoModel, AutoTokenizer

    cls_name, extra, _ = ARCHS[name]
    size = dict(vocab_size=30522, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=256, pad_token_id=0)
    cfg = getattr(transformers, cls_name)(**size, **extra)
    for key in list(cfg.to_dict()):  # no dropout anywhere: the two paths must agree step for step
        if "dropout" in key and isinstance(getattr(cfg, key, None), float):
            setattr(cfg, key, 0.0)
    folder = Path(tmp) / f"arch-{name}"
    torch.manual_seed(0)
    AutoModel.from_config(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_src).save_pretrained(folder)
    return folder


def archs(backbone, data, tmp, steps=40, max_train=0):
    """Every architecture users pick: captured or not, speed of each path, per-step loss agreement in fp32.
    max_train: tokenise only that many train rows (the speed section's time budget; 0 = all)."""
    import transformers

    out = {}
    for name, (cls_name, _, targets) in ARCHS.items():
        if not hasattr(transformers, cls_name):
            out[name] = {"captured": False, "skipped": f"this transformers ({transformers.__version__}) has no {cls_name}"}
            continue
        try:
            folder = make_arch(tmp, name, backbones.resolve_backbone(backbone))
        except Exception as e:  # noqa: BLE001  an architecture this transformers cannot build is reported
            out[name] = {"captured": False, "skipped": f"{type(e).__name__}: {str(e)[:200]}"}
            continue
        runs = {}
        modes = ("off", "auto") if torch.cuda.is_available() else ("off",)
        for mode in modes:
            cfg = reference(str(folder), data, **{"train.max_steps": steps, "train.log_every": 1, "model.dropout": 0.0,
                                                  "model.targets": targets, "model.budget": 0, "train.eval_every": 10_000,
                                                  "train.cuda_graphs": mode, "train.precision": "fp32",
                                                  "data.max_train_samples": max_train})
            said = []  # the fallback's one line says why a step did not capture
            try:
                r = run_lorakd(cfg, tmp, log=lambda *a, **k: said.append(" ".join(map(str, a))))
            except Exception as e:  # noqa: BLE001
                runs[mode] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                continue
            r["fallback"] = next((line for line in said if line.startswith("CUDA graphs off")), None)
            info = json.loads((Path(r["run_dir"]) / "run.json").read_text())["summary"]
            r["losses"] = [x["loss"] for x in read_metrics(r["run_dir"]) if x["split"] == "train"]
            r["captured"] = info["cuda_graphs"] > 0
            runs[mode] = r
        plain, graphed = runs.get("off", {}), runs.get("auto", {})
        row = {"captured": bool(graphed.get("captured")), "plain_samples_per_s": plain.get("samples_per_s"),
               "graphed_samples_per_s": graphed.get("samples_per_s") if graphed.get("captured") else None,
               "fallback": graphed.get("fallback"), "errors": {m: r["error"] for m, r in runs.items() if "error" in r}}
        if plain.get("losses") and graphed.get("losses"):
            row["max_loss_diff"] = max(abs(a - b) for a, b in zip(plain["losses"], graphed["losses"]))
        out[name] = row
        print(name, row, flush=True)
    return out


def make_roberta(tmp, tokenizer_src, known="roberta-base"):
    """roberta-base shapes (or another KNOWN_BACKBONES entry's) with random weights, with the MiniLM tokenizer
    (its ids fit the vocabulary); speed only."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = Path(tmp) / f"{known.replace(':', '-')}-random"
    cfg = backbones.backbone_config(known, 4)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_src).save_pretrained(folder)
    return str(folder)


def row(name, r, mfu_flops, peak):
    mfu = r["samples_per_s"] * mfu_flops / peak if peak else None
    return {"name": name, "samples_per_s": round(r["samples_per_s"], 1),
            "epoch_120k_s": round(FULL_SPLIT / r["samples_per_s"], 1), "peak_gb": round(r["peak_gb"], 2),
            "val_acc": None if r.get("val_acc") is None else round(r["val_acc"], 4),
            "mfu_pct": None if mfu is None else round(100 * mfu, 2), "steps": r["steps"],
            "train_time_s": round(r["train_time_s"], 2)}


def print_table(rows, cols=("name", "samples_per_s", "epoch_120k_s", "peak_gb", "val_acc", "mfu_pct", "steps",
                             "train_time_s")):
    widths = [max([len(c)] + [len(str(r.get(c))) for r in rows]) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(str(r.get(c)).ljust(w) for c, w in zip(cols, widths)))


# ---------------------------------------------------------------- speed: issue 14's figures in one call

def cli_run(backbone, data, tmp, name, overrides=()):
    """A fresh `lorakd train --config agnews-minilm --data DATA` process, command to exit."""
    out = Path(tmp) / name
    cmd = [sys.executable, "-m", "lorakd.cli", "train", "--config", "agnews-minilm", "--data", data,
           "--out", str(out), *overrides]
    if backbone != "embedded:minilm":  # the GPU machine gets MiniLM as a folder, not the PyPI wheel
        cmd.append(f"model.backbone={backbone}")
    if TINY:
        cmd += ["train.max_steps=3", "data.val_fraction=0.01"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"exit {proc.returncode}: {proc.stderr.strip()[-600:]}")
    info = json.loads((out / "run.json").read_text())
    summary = info["summary"]
    return {"wall_s": round(wall, 2), "versions": info.get("versions"), "train_time_s": summary["train_time_s"],
            "samples_per_s": round(summary["samples_per_s"], 1),
            "graph_capture_s": summary["graph_capture_s"], "cuda_graphs": summary["cuda_graphs"],
            "val_acc": summary.get("validation_accuracy"), "phases_s": summary.get("phases_s"),
            # what no phase holds: interpreter exit (CUDA context, modules) after run.json was written
            "exit_s": None if not (summary.get("phases_s") or {}).get("total") else round(wall - summary["phases_s"]["total"], 2)}


def brief(r):
    """The figures of a run worth keeping (no run folder)."""
    keep = ("samples_per_s", "steady_samples_per_s", "train_time_s", "capture_s", "graphs", "steps", "val_acc",
            "peak_gb", "wall_s")
    return {k: (round(r[k], 4) if isinstance(r[k], float) else r[k]) for k in keep if k in r}


def ratio(a, b):
    return None if not a or not b else round(a / b, 2)


def speed(backbone, data, tmp, out_dir, deadline_s=400, peer_steps=400, parts=None):
    """Everything speed-summary.json holds, each part saved as soon as it is measured; a part that fails is
    recorded under "errors" and the next one runs; parts not started by deadline_s are listed as skipped.
    parts: the names to run (default all), in this order."""
    import peft
    import transformers

    t_start = time.perf_counter()
    # the CLI child runs from the repo root: folders given relative to where the bench was started are made absolute
    backbone, data = (str(Path(x).resolve()) if Path(x).exists() else x for x in (backbone, data))
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    res = {"device": dev, "date": date.today().isoformat(), "torch": torch.__version__,
           "transformers": transformers.__version__, "peft": peft.__version__, "tiny": TINY,
           "errors": {}, "skipped": []}
    paths = result_paths("speed-summary", out_dir, dev)
    path = paths[0]
    if parts and path.exists():  # a run of some parts adds them to the file; a full run rewrites it
        old = json.loads(path.read_text())
        res = {**old, **res, "errors": {k: v for k, v in old.get("errors", {}).items() if k not in parts},
               "skipped": [k for k in old.get("skipped", []) if k not in parts]}
    peak = peak_flops()
    n = 3 if TINY else None  # steps of every part under LORAKD_BENCH_TINY=1
    ref = reference(backbone, data)
    n_train = len(data_lib.load_splits(ref.data, 42)["train"])
    repeat = math.ceil(FULL_SPLIT / n_train)
    tok_src = backbones.resolve_backbone(backbone)

    def cli():
        # the first process follows only this bench's own `import torch`: close to a fresh machine's first
        res["cli"] = {"first": cli_run(backbone, data, tmp, "cli-1")}
        res["cli"]["second"] = cli_run(backbone, data, tmp, "cli-2")
        res["cli_wall_s"] = {k: v["wall_s"] for k, v in res["cli"].items()}
        res["phases_s"] = {k: v["phases_s"] for k, v in res["cli"].items()}

    def peer_ref():
        cfg = config_lib.override(ref, **{"train.max_steps": n}) if n else ref
        res["peer_ref"] = run_peer(cfg, tmp, max_steps=n or 0)
        ours = res.get("cli", {})
        res["cli_train_speedup"] = {k: ratio(res["peer_ref"]["train_time_s"], v["train_time_s"]) for k, v in ours.items()}

    def arch_table():
        res["archs"] = archs(backbone, data, tmp, steps=n or 40, max_train=200 if TINY else 2000)

    def mpnet_teacher():
        folder = make_roberta(tmp, tok_src, known=backbones.MPNET)
        cfg = reference(folder, data, **{"role": "teacher", "model.full_finetune": True, "model.budget": 0,
                                         "train.batch_size": 16, "train.lr": 2e-5})
        peer = run_peer(cfg, tmp, max_steps=n or 150, evaluate=False)
        ours = run_lorakd(config_lib.override(cfg, **{"train.max_steps": n or 500}), tmp)  # about one epoch
        res["mpnet_teacher"] = {"peer": brief(peer), "lorakd": brief(ours), "batch": 16, "full_finetune": True}
        res["speedup_mpnet_teacher"] = ratio(ours["samples_per_s"], peer["samples_per_s"])
        shutil.rmtree(folder, ignore_errors=True)

    def minilm_120k():
        steps = n or FULL_SPLIT // 24
        cfg = reference(backbone, data, **{"data.repeat": repeat, "train.max_steps": steps})
        ours = run_lorakd(cfg, tmp)
        peer = run_peer(reference(backbone, data, **{"data.repeat": repeat}), tmp, max_steps=n or peer_steps,
                        evaluate=False)
        res["minilm_120k"] = {"peer": brief(peer), "lorakd": brief(ours), "batch": 24}
        res["speedup_minilm_120k"] = ratio(ours["samples_per_s"], peer["samples_per_s"])

    def roberta():
        folder = make_roberta(tmp, tok_src)
        cfg = reference(folder, data, **{"model.budget": 0})  # steps past an epoch: the next epoch's batches
        fps = flops_per_sample(folder, mean_tokens(ref))
        peer = run_peer(cfg, tmp, max_steps=n or 300, evaluate=False)
        ours = run_lorakd(config_lib.override(cfg, **{"train.max_steps": n or 1200}), tmp)
        res["roberta"] = {"peer": brief(peer), "lorakd": brief(ours), "batch": 24}
        res["speedup_roberta"] = ratio(ours["samples_per_s"], peer["samples_per_s"])
        save()
        big = 32 if TINY else 256
        b256 = run_lorakd(config_lib.override(cfg, **{"train.max_steps": n or 200, "train.batch_size": big,
                                                      "train.lr": 1e-3}), tmp)
        steady = b256["steady_samples_per_s"] or b256["samples_per_s"]
        res["roberta_b256"] = {**brief(b256), "batch": big, "flops_per_sample": fps, "peak_flops": peak}
        res["mfu_roberta_b256"] = None if not peak else round(steady * fps / peak, 4)  # graph capture left out
        shutil.rmtree(folder, ignore_errors=True)

    def lever_table():
        # a second call (--parts levers): 1,000 steps at 120k scale each; compile pays its compile time here
        rows = levers(backbone, data, tmp, n or 1000)
        res["levers"] = {k: (brief(v) if "error" not in v else v) for k, v in rows.items()}

    def save():
        write_result(paths, res)

    for name, part in (("cli", cli), ("peer_ref", peer_ref), ("archs", arch_table), ("mpnet_teacher", mpnet_teacher),
                       ("minilm_120k", minilm_120k), ("roberta", roberta), ("levers", lever_table)):
        if (parts and name not in parts) or (not parts and name == "levers"):
            continue
        elapsed = time.perf_counter() - t_start
        if elapsed > deadline_s:
            res["skipped"].append(name)
            save()
            continue
        print(f"== speed: {name} (at {elapsed:.0f} s)", flush=True)
        try:
            part()
        except Exception as e:  # noqa: BLE001  one part failing must not lose the others
            res["errors"][name] = f"{type(e).__name__}: {str(e)[:600]}"
            traceback.print_exc()
        res["bench_s"] = round(time.perf_counter() - t_start, 1)
        save()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(json.dumps({k: v for k, v in res.items() if k not in ("archs", "cli", "phases_s")}, indent=1, default=str))
    print(f"wrote {path}")
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="embedded:minilm")
    ap.add_argument("--data", default="../shared/data/ag_news")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--only", default="check,minilm,levers,roberta,batch,predict")
    ap.add_argument("--lever-steps", type=int, default=1000)
    ap.add_argument("--roberta-steps", type=int, default=300)
    ap.add_argument("--peer-steps", type=int, default=600)
    ap.add_argument("--tag", default="", help="suffix of the result file's name")
    ap.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=[42, 43])
    ap.add_argument("--deadline", type=float, default=400, help="speed: start no part after this many seconds")
    ap.add_argument("--parts", default="", help="speed: only these parts (cli,peer_ref,archs,mpnet_teacher,"
                                                "minilm_120k,roberta; levers only when named)")
    args = ap.parse_args()
    only = set(args.only.split(","))
    tmp = tempfile.mkdtemp(prefix="lorakd-bench-")
    if only == {"speed"}:  # its own summary file, nothing else
        speed(args.backbone, args.data, tmp, args.out, args.deadline, min(args.peer_steps, 400),
              [p for p in args.parts.split(",") if p])
        shutil.rmtree(tmp, ignore_errors=True)
        return
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = peak_flops()
    import peft
    import transformers
    result = {"device": dev, "date": date.today().isoformat(), "torch": torch.__version__,
              "transformers": transformers.__version__, "peft": peft.__version__, "rows": [], "notes": {}}
    tag = f"-{args.tag}" if args.tag else ""
    out_path, scratch_path = result_paths(f"bench{tag}", args.out, dev)

    def save():
        write_result((out_path, scratch_path), result)

    ref = reference(args.backbone, args.data)
    fps_minilm = flops_per_sample(args.backbone, mean_tokens(ref))
    if "archs" in only:
        result["archs"] = archs(args.backbone, args.data, tmp)
        save()
    if "check" in only:
        result["check"] = check_fast_path(args.backbone, args.data, tmp)
        print("fast-path check:", json.dumps(result["check"]), flush=True)
        save()
    if "minilm" in only or "accuracy" in only:
        # The validation split is 440 rows (one sample = 0.23 pt), so accuracy is compared over seeds.
        accs = {"peer": [], "lorakd": []}
        for seed in args.seeds:
            seeded = config_lib.override(ref, **{"train.seed": seed})
            peer = run_peer(seeded, tmp)
            result["rows"].append(row(f"peer minilm ref (sample, 3 ep, seed {seed})", peer, fps_minilm, peak))
            ours = run_lorakd(seeded, tmp)
            result["rows"].append(row(f"lorakd minilm ref (sample, 3 ep, seed {seed})", ours, fps_minilm, peak))
            # length-grouped batches are the one lever that changes what a batch holds: measured without too
            free = run_lorakd(config_lib.override(seeded, **{"data.group_by_length": False}), tmp)
            result["rows"].append(row(f"lorakd minilm ref, random batches (seed {seed})", free, fps_minilm, peak))
            accs.setdefault("lorakd_random_batches", []).append(free["val_acc"])
            accs["peer"].append(peer["val_acc"])
            accs["lorakd"].append(ours["val_acc"])
            result["notes"].setdefault("speedup_ref", []).append(round(ours["samples_per_s"] / peer["samples_per_s"], 2))
            save()
        mean = {k: sum(v) / len(v) for k, v in accs.items()}
        result["notes"]["mean_val_acc"] = {k: round(v, 4) for k, v in mean.items()}
        result["notes"]["acc_gap_pt"] = round(100 * (mean["lorakd"] - mean["peer"]), 2)
        result["peer_val_acc"] = mean["peer"]
        save()
    if "minilm" in only:
        ours120, peer120 = full_scale(args.backbone, args.data, tmp, peer_steps=args.peer_steps)
        result["rows"].append(row(f"peer minilm 120k ({args.peer_steps} steps timed)", peer120, fps_minilm, peak))
        result["rows"].append(row("lorakd minilm 120k (1 epoch)", ours120, fps_minilm, peak))
        result["notes"]["speedup_120k"] = round(ours120["samples_per_s"] / peer120["samples_per_s"], 2)
        save()
        print_table(result["rows"])
    if "levers" in only:
        for name, r in levers(args.backbone, args.data, tmp, args.lever_steps).items():
            result["rows"].append(row(f"lever: {name} ({args.lever_steps} steps)", r, fps_minilm, peak))
        save()
    if "roberta" in only:
        rb = make_roberta(tmp, backbones.resolve_backbone(args.backbone))
        n_train = len(data_lib.load_splits(ref.data, 42)["train"])
        rcfg = reference(rb, args.data, **{"model.budget": 0, "data.repeat": math.ceil(FULL_SPLIT / n_train)})
        fps_rb = flops_per_sample(rb, mean_tokens(ref))
        peer = run_peer(rcfg, tmp, max_steps=args.roberta_steps, evaluate=False)
        result["rows"].append(row(f"peer roberta-base shapes ({args.roberta_steps} steps)", peer, fps_rb, peak))
        ours = run_lorakd(config_lib.override(rcfg, **{"train.max_steps": args.roberta_steps * 4}), tmp)
        result["rows"].append(row(f"lorakd roberta-base shapes ({args.roberta_steps * 4} steps)", ours, fps_rb, peak))
        result["notes"]["speedup_roberta"] = round(ours["samples_per_s"] / peer["samples_per_s"], 2)
        shutil.rmtree(rb, ignore_errors=True)
        save()
    if "batch" in only:
        target = result.get("peer_val_acc")
        for bs, lr in ((64, 4e-4), (128, 6e-4)):
            r = run_lorakd(reference(args.backbone, args.data, **{"train.batch_size": bs, "train.lr": lr}), tmp)
            result["rows"].append(row(f"lorakd minilm batch {bs} lr {lr:g} (sample, 3 ep)", r, fps_minilm, peak))
            result["notes"][f"batch{bs}_reaches_peer_acc"] = None if target is None else r["val_acc"] >= target - 0.003
        save()
    if "predict" in only:
        from lorakd.predict import predict
        steps = 50 if torch.cuda.is_available() else 5  # the adapter's quality does not matter here
        run_dir = run_lorakd(reference(args.backbone, args.data, **{"train.max_steps": steps}), tmp)["run_dir"]
        texts = data_lib.read_splits(args.data, ref.data.label_names)["train"].texts
        inp = Path(tmp) / "unlabelled.jsonl"
        inp.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
        predict(run_dir, inp, Path(tmp) / "warm.csv", log=lambda *a: None)  # warm-up: CUDA context, kernels
        stats = predict(run_dir, inp, Path(tmp) / "pred.csv", batch_size=512, log=lambda *a: None)
        result["predict"] = {"texts": stats["n"], "texts_per_s": round(stats["texts_per_s"], 1), "device": dev,
                             "cpu_threads": torch.get_num_threads()}
        print("predict:", result["predict"])
        save()
    print_table(result["rows"])
    print(json.dumps(result["notes"]))
    print(f"wrote {out_path}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
