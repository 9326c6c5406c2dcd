"""Data: the labelled splits (files through readers, or the hub), validation carved, data.labelled, augmentation,
tokenised once, batched by length."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from .config import AG_NEWS_LABELS
from .errors import UserError, first_line
from .readers import frame_to_split, read_file
from .rows import FORMATS, Split

HUB_ALIASES = {"ag_news": "fancyzhx/ag_news", "fancyzhx/ag_news": "fancyzhx/ag_news"}
def _load_hub(name, names) -> dict[str, Split]:
    from .backbones import hub_out_of_reach

    if hub_out_of_reach():  # the local datasets cache at once, or one line; not half a minute of retries
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import datasets
    except ImportError:
        raise UserError(f"data.path {name}: loading from the hub needs `pip install datasets`") from None
    hub_id = HUB_ALIASES.get(name, name)
    try:
        ds = datasets.load_dataset(hub_id)
    except Exception as e:
        raise UserError(f"data.path {name}: could not load {hub_id} from the hub ({type(e).__name__}: "
                        f"{first_line(e, 200)})") from None
    out = {}
    for split in sorted(ds, key=lambda s: s != "train"):  # train first: its classes, when from the data, are all's
        out[split] = frame_to_split(ds[split].to_pandas(), names, f"{hub_id}[{split}]")
        names = names if names is not None else out[split].label_names
    return out


_LAST_READ = {}  # the splits with_label_names read, kept for load_splits: a file is read once, not twice


def _stamp(p: Path):
    return tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in ([p] if p.is_file() else sorted(p.iterdir())))


def read_splits(path, names) -> dict[str, Split]:
    """{'train': Split, 'test': Split?} from a folder, one file, or a hub id. names None: the classes come from
    the train split's labels (names_from_labels), on each Split's label_names."""
    p = Path(path) if path else None
    if p is not None and p.exists() and names is not None:
        key = (str(p.resolve()), tuple(names), _stamp(p))
        if key in _LAST_READ:
            return _LAST_READ.pop(key)
    if not path:
        raise UserError("data.path is not set: pass --data FOLDER_OR_FILE or set data.path in the config")
    p = Path(path)
    if str(path).startswith("hub:") or (not p.exists() and str(path) in HUB_ALIASES):
        return _load_hub(str(path).removeprefix("hub:"), names)
    if not p.exists():
        raise UserError(f"{p}: no such file or folder (data.path)")
    if p.is_file():
        return {"train": read_file(p, names)}
    out = {}
    for split in ("train", "test"):
        found = [p / f"{split}{ext}" for ext in FORMATS if (p / f"{split}{ext}").exists()]
        if len(found) > 1:
            raise UserError(f"{p}: {' and '.join(f.name for f in found)}: more than one {split} file; keep one")
        if found:
            out[split] = read_file(found[0], names)
            names = names if names is not None else out[split].label_names  # test takes train's classes
    if "train" not in out:
        raise UserError(f"{p}: no train.csv, train.jsonl or train.parquet in this folder")
    return out


def stratified_split(labels: np.ndarray, fraction: float, seed: int):
    """(train_idx, val_idx): the same fraction of every class, the same indices for the same seed. A class
    of two rows or more gives at least one validation row when fraction > 0 (a small file still validates)."""
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_val = int(round(fraction * len(idx)))
        if fraction > 0 and len(idx) >= 2:
            n_val = max(n_val, 1)
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))


def stratified_take(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of n rows with the classes in the proportions they have (largest remainders round)."""
    classes, counts = np.unique(labels, return_counts=True)
    want = counts * n / len(labels)
    take = np.floor(want).astype(int)
    take[np.argsort(-(want - take), kind="stable")[: n - take.sum()]] += 1
    rng = np.random.default_rng([seed, n])
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]))


def with_label_names(cfg, log=print):
    """cfg with data.label_names taken from the data when the config leaves them at their default and the
    train labels are text (positive/negative: sorted), said in one line; else cfg as it is. The run's
    config.yaml then keeps them, and everything after (eval, predict, export) reads them there."""
    from .config import override

    if tuple(cfg.data.label_names) != AG_NEWS_LABELS:  # given: a fixed order
        return cfg
    splits = read_splits(cfg.data.path, None)
    names = splits["train"].label_names
    p = Path(cfg.data.path)
    if p.exists():
        _LAST_READ.clear()
        _LAST_READ[(str(p.resolve()), names, _stamp(p))] = splits
    if names == AG_NEWS_LABELS:
        return cfg
    log(f"labels from the data: {', '.join(names)} (set data.label_names for another order)")
    return override(cfg, **{"data.label_names": list(names)})


def load_splits(data_cfg, seed) -> dict[str, Split]:
    """train / validation (carved from train) / test (when present), as the config asks. With data.labelled
    N, train keeps N stratified rows and the others come back as 'unlabelled' (their labels unused).
    `seed` (the run's train.seed) draws them unless data.split_seed fixes the split apart from it."""
    seed = data_cfg.split_seed if data_cfg.split_seed >= 0 else seed
    splits = read_splits(data_cfg.path, data_cfg.label_names)
    train = splits["train"]
    missing = [n for i, n in enumerate(data_cfg.label_names) if not (train.labels == i).any()]
    if missing:  # a head for a class it never sees, and a row of zeros in every table
        raise UserError(f"{data_cfg.path}: no train row of class {', '.join(map(repr, missing))} of data.label_names "
                        f"({len(data_cfg.label_names)} names); name only the classes the data has")
    if "validation" in splits:
        val = splits["validation"]
    else:
        tr, va = stratified_split(train.labels, data_cfg.val_fraction, seed)
        train, val = train.subset(tr), train.subset(va)
        if not len(train):
            raise UserError(f"{data_cfg.path}: no training rows left after carving data.val_fraction="
                            f"{data_cfg.val_fraction} for validation")
    out = {}
    if data_cfg.labelled:
        if data_cfg.labelled >= len(train):
            raise UserError(f"data.labelled={data_cfg.labelled}: the train split has only {len(train)} rows "
                            f"after validation is carved (use 0 for all)")
        keep = stratified_take(train.labels, data_cfg.labelled, seed)
        rest = np.setdiff1d(np.arange(len(train)), keep)
        train, out["unlabelled"] = train.subset(keep), train.subset(rest)
    if data_cfg.max_train_samples:
        train = train.subset(np.arange(min(data_cfg.max_train_samples, len(train))))
    if data_cfg.repeat > 1:
        train = train.subset(np.tile(np.arange(len(train)), data_cfg.repeat))
    out.update(train=train, validation=val)
    if "test" in splits:
        out["test"] = splits["test"]
    return out


def augment(texts: list[str], copies: int, ops, seed: int, mask_token: str = "[MASK]") -> list[str]:
    """`copies` augmented versions of each text, a pure function of (texts, copies, ops, seed), on words:
    delete: drop 15% of the words; swap: with p 0.5 swap two spans of up to a quarter of the words each;
    mask: replace 15% of the words with the tokenizer's mask token; mix: with p 0.5 the second half
    becomes another random text's second half (a blend whose soft label only a teacher can give).
    The teachers label these rows, so an edit that changes the topic is no harm: the target follows it."""
    out = []
    n = len(texts)
    for k in range(copies):
        rng = np.random.default_rng([seed, k, 7])
        for i, text in enumerate(texts):
            words = text.split()
            if "delete" in ops and len(words) > 3:
                kept = [w for w in words if rng.random() >= 0.15]
                words = kept or words
            if "swap" in ops and len(words) >= 4 and rng.random() < 0.5:
                span = int(rng.integers(1, max(2, len(words) // 4)))
                a, b = sorted(rng.choice(len(words) - span + 1, 2, replace=False))
                if b - a >= span:  # two spans that do not overlap
                    words = words[:a] + words[b:b + span] + words[a + span:b] + words[a:a + span] + words[b + span:]
            if "mask" in ops:
                words = [mask_token if rng.random() < 0.15 else w for w in words]
            if "mix" in ops and n > 1 and rng.random() < 0.5:
                other = texts[int(rng.integers(n))].split()
                words = words[: max(1, len(words) // 2)] + other[len(other) // 2:]
            out.append(" ".join(words))
    return out


def fingerprint(split: Split, extra="") -> str:
    """A short hash of the texts and labels (and anything else that shapes a cache)."""
    h = hashlib.sha256(extra.encode())
    for t in split.texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    if split.labels is not None:
        h.update(split.labels.tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- tokens and batches

def encode(tokenizer, texts, max_length, chunk=4096) -> list[np.ndarray]:
    """Token ids per text, unpadded: tokenised once, then batches only index and pad.

    A text is cut to 64 characters per token first: the tokenizer would read a 10 MB row whole
    (seconds) only to truncate it; real text never spends 64 characters on one token."""
    out = []
    for i in range(0, len(texts), chunk):
        cut = [t[: max_length * 64] for t in texts[i: i + chunk]]
        if hasattr(tokenizer, "encode_batch"):  # a bare `tokenizers` Tokenizer (predict.onnx_tokenizer)
            tokenizer.enable_truncation(max_length)
            ids = [e.ids for e in tokenizer.encode_batch(cut)]
        else:  # ids only: masks come from lengths (TokenStore.batch)
            ids = tokenizer(cut, truncation=True, max_length=max_length, return_attention_mask=False,
                            return_token_type_ids=False)["input_ids"]
        out.extend(np.asarray(i, dtype=np.int32) for i in ids)
    return out


def pad_id(tok) -> int:
    """The one rule for the id padding is written with: the tokenizer's, else 0 (the mask hides it either way)."""
    return tok.pad_token_id or 0


def folder_max_length(tok) -> int:
    """The length an exported folder's texts are cut to: `lorakd export` writes the run's data.max_length into
    its tokenizer; a folder from elsewhere may say 1e30 (transformers' "unknown"), then 512."""
    return tok.model_max_length if tok.model_max_length <= 4096 else 512


def batch_order(lengths, batch_size, seed, epoch, group_by_length=True, shuffle=True) -> list[np.ndarray]:
    """The batches of one epoch, a pure function of (seed, epoch): resume replays the same order.

    Grouping sorts each window of 50 batches by length, so a batch pads little and the
    padded lengths take few distinct values (one CUDA graph each)."""
    n = len(lengths)
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    if group_by_length:
        window = batch_size * 50
        lengths = np.asarray(lengths)
        order = np.concatenate([w[np.argsort(-lengths[w], kind="stable")]
                                for w in np.array_split(order, max(1, -(-n // window)))])
    batches = [order[i: i + batch_size] for i in range(0, n, batch_size)]
    if group_by_length and shuffle:
        perm = np.random.default_rng([seed, epoch, 1]).permutation(len(batches))
        batches = [batches[i] for i in perm]
    return batches


def pad_multiple(setting: int, max_length: int, device_type: str, batch_size: int) -> int:
    """data.pad_multiple, 0 = auto. Small batches on a GPU: every batch shape is a CUDA graph to capture, and
    capture costs more than the extra padding (32: 4 shapes at 128 tokens, against 8 at 16). Large batches
    (over 64) and a CPU: padding is compute, so 16."""
    if setting:
        return setting
    wide = device_type == "cuda" and batch_size <= 64
    return next(m for m in (32, 16, 8, 4, 2, 1) if max_length % m == 0 and (m < 32 or wide))


def pad_rows(encoded, pad_id, multiple=1, max_length=None) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) int64 [rows, width] of token-id rows, padded to the longest (rounded up to
    a multiple of `multiple`, never past max_length)."""
    longest = max(len(e) for e in encoded)
    width = max(pad_length(longest, multiple, max_length), longest)
    ids = np.full((len(encoded), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(encoded), width), dtype=np.int64)
    for row, e in enumerate(encoded):
        ids[row, : len(e)] = e
        mask[row, : len(e)] = 1
    return ids, mask


def pad_length(n, multiple=16, max_length=None):
    m = -(-n // multiple) * multiple
    return min(m, max_length) if max_length else m


class TokenStore:
    """One split's token ids padded once into a [N, L] tensor on the device.

    A batch is then an index tensor: ids and mask are gathered where the model runs, so a training
    step moves only B integers from the host (and a CUDA graph takes that index as its one input)."""

    def __init__(self, encoded, labels, pad_id, device, multiple=16):
        import torch

        self.lengths_np = np.asarray([len(e) for e in encoded], dtype=np.int64)
        self.width_max = pad_length(int(self.lengths_np.max()), multiple)
        ids = np.full((len(encoded), self.width_max), pad_id, dtype=np.int64)
        for row, e in enumerate(encoded):
            ids[row, : len(e)] = e
        self.multiple = multiple
        self.ids = torch.from_numpy(ids).to(device)
        self.lengths = torch.from_numpy(self.lengths_np).to(device)
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long).to(device)

    def __len__(self):
        return len(self.lengths_np)

    def width(self, idx) -> int:
        """Padded length for a batch: a multiple of `multiple` (data.pad_multiple), so few distinct shapes occur."""
        return min(pad_length(int(self.lengths_np[idx].max()), self.multiple), self.width_max)

    def batch(self, idx_t, width):
        import torch

        ids = self.ids[idx_t, :width]
        mask = (torch.arange(width, device=ids.device)[None, :] < self.lengths[idx_t, None]).long()
        return ids, mask
