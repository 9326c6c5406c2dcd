"""A trained model opened for inference, one way for every command (a teacher's logits, eval, predict, export): a
run folder, or an exported Hugging Face or adapter folder, on its device in its inference precision, with its
tokenizer; its logits over any texts, a chunk at a time, in length-sorted batches."""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import backbones, dist, graphs
from . import data as data_lib
from . import model as model_lib
from .errors import UserError, first_line
from .runs import load_run, with_backbone
from .trust import check_folder, read_json

CHUNK = 16_384  # texts tokenised and labelled at a time: a large transfer set streams through the model


@dataclass(frozen=True)
class TrainedModel:
    """What inference needs of a trained model. cfg and info (run.json) are the run's, None for an exported folder;
    model: in eval mode on `device`, in the precision graphs.for_inference gives it; amp: its autocast dtype (None:
    fp32)."""
    cfg: object
    info: dict | None
    model: torch.nn.Module
    tok: object
    device: torch.device
    amp: torch.dtype | None
    max_length: int

    @property
    def pad_id(self) -> int:
        return data_lib.pad_id(self.tok)

    def logits(self, texts, batch_size, desc=None) -> torch.Tensor:
        """float32 logits [N, C] on the CPU, in the texts' order; desc names a progress bar. Under torchrun the
        processes split the rows (every world-th one each) and gather them."""
        rank, world, _ = dist.env()
        dist.init(self.device, world)  # the pipeline labels rows before any training process group exists
        starts = range(0, len(texts), CHUNK)
        mine = sum(len(dist.shard(min(CHUNK, len(texts) - s), rank, world)) for s in starts)  # this process's rows
        chunks = []
        with progress_bar(mine, desc) if desc else contextlib.nullcontext() as bar:
            for start in starts:
                encoded = data_lib.encode(self.tok, texts[start: start + CHUNK], self.max_length)
                store = data_lib.TokenStore(encoded, None, self.pad_id, self.device)
                rows = dist.shard(len(store), rank, world)
                part = logits_for(self.model, store, batch_size, self.amp, rows, bar)
                chunks.append(dist.gather_rows(part, rows, len(store), world, self.device))
        return torch.cat(chunks)


def open_run(run_dir, device, backbone=None, merge=True, precision=None) -> TrainedModel:
    """A finished run's model (its backbone optionally an equal copy elsewhere: runs.with_backbone), in the
    run's train.precision unless `precision` says otherwise; merge=False keeps its adapter apart."""
    cfg, info = load_run(run_dir)
    return open_loaded(run_dir, with_backbone(cfg, info, backbone), info, device, merge, precision)


def open_loaded(run_dir, cfg, info, device, merge=True, precision=None) -> TrainedModel:
    """open_run for a run whose config and run.json the caller has read already (load_run, with_backbone)."""
    model = model_lib.load_trained(cfg, run_dir, len(cfg.data.label_names))
    tok = backbones.load_tokenizer(cfg.model.backbone)
    model, amp = graphs.for_inference(model, device, precision or cfg.train.precision, merge)
    return TrainedModel(cfg, info, model, tok, device, amp, cfg.data.max_length)


def open_folder(kind, p: Path, device, names=None, backbone=None) -> TrainedModel:
    """An exported folder: kind "hf" (LoRA merged), or "adapter" on its base (class names `names`)."""
    backbones.quiet_transformers()
    model = _open_adapter(p, backbone, names) if kind == "adapter" else _open_export(p)
    tok = _open_tokenizer(p)
    model, amp = graphs.for_inference(model, device, "auto")
    return TrainedModel(None, None, model, tok, device, amp, data_lib.folder_max_length(tok))


def progress_bar(total: int, desc: str):
    """A bar over `total` rows for an evaluation or a teacher's pass, as the training bar: on rank 0 and on a
    terminal only. It leaves no line behind, so the metric lines after it stand alone."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="rows", leave=False, dynamic_ncols=True, mininterval=1.0,
                disable=dist.env()[0] != 0 or None)


@torch.inference_mode()
def logits_for(model, store, batch_size, amp_dtype=None, indices=None, bar=None) -> torch.Tensor:
    """float32 logits [N, C] on the CPU, batches sorted by length so little is padded; `bar` (progress_bar)
    counts the rows."""
    idx_all = np.arange(len(store)) if indices is None else np.asarray(indices)
    order = idx_all[np.argsort(-store.lengths_np[idx_all], kind="stable")]
    device = store.ids.device
    was_training = model.training
    model.eval()
    out = torch.empty(len(idx_all), model.config.num_labels if hasattr(model, "config") else 0)
    pos = {int(i): k for k, i in enumerate(idx_all)}
    chunks = []
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        ids, mask = store.batch(torch.as_tensor(idx, device=device), store.width(idx))
        with graphs.autocast(device, amp_dtype):
            chunks.append((idx, model(input_ids=ids, attention_mask=mask).logits.float()))
        if bar is not None:
            bar.update(len(idx))
    for idx, logits in chunks:
        out[[pos[int(i)] for i in idx]] = logits.cpu()
    model.train(was_training)
    return out


# ---------------------------------------------------------------- exported folders

def _open_adapter(p: Path, backbone, names):
    """An adapter folder on its base, named in adapter_config.json (embedded:* and hub ids resolved here)."""
    from peft import PeftModel
    from safetensors import SafetensorError
    from transformers import AutoModelForSequenceClassification

    base = backbone or read_json(p / "adapter_config.json").get("base_model_name_or_path")
    if not isinstance(base, str):
        raise UserError(f"{p}/adapter_config.json: no base_model_name_or_path; pass --backbone")
    id2label = dict(enumerate(names))
    src = backbones.resolve_backbone(base)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            src, id2label=id2label, label2id={n: i for i, n in id2label.items()}, **backbones.safe_kwargs(src))
    except (OSError, SafetensorError) as e:
        raise backbones.load_error("base model", base, "weights", e) from None
    check_folder(p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return PeftModel.from_pretrained(model, p)
        except (RuntimeError, SafetensorError) as e:
            raise UserError(f"{p}: the adapter does not load ({first_line(e)})") from None


def _open_export(p: Path):
    """An exported Hugging Face folder (LoRA merged)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForSequenceClassification

    try:
        return AutoModelForSequenceClassification.from_pretrained(p, **backbones.safe_kwargs(p))
    except (OSError, SafetensorError) as e:
        raise UserError(f"{p}: cannot load its weights ({first_line(e)})") from None


def _open_tokenizer(p: Path):
    from transformers import AutoTokenizer

    tok_kwargs = backbones.safe_kwargs(p)  # outside the try: its own UserError stays as it is
    try:
        tok = AutoTokenizer.from_pretrained(p, **tok_kwargs)
        tok("a probe text", truncation=True, max_length=8)  # a bad post-processor panics at the first encode
    except BaseException as e:  # the Rust tokenizer's panic on a bad tokenizer.json is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise UserError(f"{p}: cannot load its tokenizer ({first_line(e)})") from None
    return tok
