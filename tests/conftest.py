"""Shared fixtures: a tiny randomly initialised BERT folder and small generated AG-News-like data."""
import csv
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED_AG_NEWS = REPO.parent / "shared" / "data" / "ag_news"
TOPICS = [
    ["election", "minister", "president", "treaty", "embassy", "parliament", "war", "peace"],
    ["match", "goal", "season", "coach", "league", "tennis", "football", "champion"],
    ["shares", "profit", "market", "stocks", "bank", "earnings", "oil", "merger"],
    ["software", "internet", "computer", "space", "nasa", "chip", "wireless", "linux"],
]
FILLER = ["the", "a", "of", "in", "on", "said", "today", "new", "after", "report", "with", "for"]


def make_texts(n_per_class, seed=0):
    rng = random.Random(seed)
    rows = []
    for label, words in enumerate(TOPICS):
        for _ in range(n_per_class):
            k = rng.randint(4, 20)
            toks = [rng.choice(words) if rng.random() < 0.45 else rng.choice(FILLER) for _ in range(k)]
            rows.append((label, " ".join(toks)))
    rng.shuffle(rows)
    return rows


def write_charcnn(path, rows):
    """CharCNN layout: "class","title","description", classes 1..4, every field quoted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, quoting=csv.QUOTE_ALL)
        for label, text in rows:
            half = len(text) // 2
            cut = text.find(" ", half)
            cut = cut if cut > 0 else len(text)
            w.writerow([label + 1, text[:cut], text[cut:].strip()])
    return path


def write_sweep(folder, tiny_config, **spec):
    """A base config next to a sweep file that names it relatively."""
    import yaml
    from lorakd import config

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "base.yaml").write_text(config.to_yaml(tiny_config(**{"train.epochs": 1})))
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "base": "base.yaml", **spec}, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory):
    """A 2-layer, 32-wide BERT with random weights and a word-level vocabulary of the generated data."""
    import torch
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted({w for t in TOPICS for w in t} | set(FILLER))
    backend = Tokenizer(WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(folder)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, pad_token_id=0,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # randomness only where tests ask
    BertForSequenceClassification(cfg).bert.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A folder with train.csv (400 rows) and test.csv (80 rows) in the CharCNN layout."""
    folder = tmp_path_factory.mktemp("tiny-data")
    write_charcnn(folder / "train.csv", make_texts(100, seed=1))
    write_charcnn(folder / "test.csv", make_texts(20, seed=2))
    return folder


@pytest.fixture
def tiny_config(tiny_backbone, tiny_data):
    """A config that trains the tiny BERT in a few seconds on the CPU."""
    from lorakd import config

    def make(**overrides):
        base = {"name": "tiny", "data.path": str(tiny_data), "data.val_fraction": 0.1, "data.max_length": 32,
                "model.backbone": str(tiny_backbone), "model.r": 4, "model.alpha": 8, "model.dropout": 0.0,
                "train.lr": 2e-2, "train.batch_size": 8, "train.epochs": 5, "train.log_every": 5,
                "train.checkpoint_every": 0, "train.eval_batch_size": 64, "train.threads": 1}
        base.update(overrides)
        return config.load(None, [], base)

    return make


@pytest.fixture
def lock_holder():
    """hold(folder): another process that holds folder's run lock until the test ends (or kills it)."""
    import subprocess
    import sys

    procs = []

    def hold(folder):
        code = ("import sys, time\nfrom lorakd.runs import run_lock\nwith run_lock(sys.argv[1]):\n"
                "    print('locked', flush=True)\n    time.sleep(600)\n")
        proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()
        proc.stdout.close()


@pytest.fixture(scope="session")
def learned_run(tmp_path_factory, tiny_backbone, tiny_data):
    """A finished tiny run that has learned the task (3 epochs): predict and export compare against it.
    Tests write their outputs elsewhere, so one run serves every module."""
    from lorakd import config
    from lorakd.train import train

    cfg = config.load(None, [], {"data.path": str(tiny_data), "model.backbone": str(tiny_backbone), "model.r": 4,
                                 "train.lr": 1e-2, "train.batch_size": 8, "train.epochs": 3, "train.threads": 1,
                                 "data.max_length": 32, "train.checkpoint_every": 0})
    run = tmp_path_factory.mktemp("learned") / "run"
    train(cfg, run, log=lambda *a: None)
    return run
