"""The benches' own arithmetic: what bench/distill_gain.py reports as gains must be what its runs say."""
import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gain():
    spec = importlib.util.spec_from_file_location("distill_gain", REPO / "bench" / "distill_gain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(seed, arm, last, best=None, student="s", regime="few"):
    return {"seed": seed, "regime": regime, "student": student, "arm": arm, "val": best or last, "val_last": last}


def test_gains_use_the_last_evaluation_paired_by_seed(gain):
    """CE for 20 epochs has the best best-of-evals figure, but arms are compared on their last evaluation; the
    gain is the best KD arm over the best CE arm, paired over the seeds both ran, the best picked among arms run
    on every seed the reference CE arm ran; a student that lost its KD
    arms to a deadline reports its arms and no gain."""
    runs = [run(1, "ce", 0.80), run(2, "ce", 0.82),
            run(1, "ce_e20", 0.84, best=0.90), run(2, "ce_e20", 0.86, best=0.91),
            run(1, "kd_transfer", 0.86), run(2, "kd_transfer", 0.87),
            run(1, "kd_lr1e3", 0.88), run(2, "kd_lr1e3", 0.87), run(3, "kd_lr1e3", 0.99),
            run(1, "self_train", 0.85), run(2, "self_train", 0.85),
            run(1, "kd_one_seed", 0.99), run(1, "ce_one_seed", 0.99),  # not on every seed: never the best
            run(1, "ce", 0.70, student="cut")]
    result = {"device": "cpu", "date": "d", "seeds": [1, 2, 3], "runs": runs,
              "teachers": [{"seed": 1, "regime": "few", "teacher": "mpnet-0", "val": 0.9, "val_last": 0.89},
                           {"seed": 2, "regime": "few", "teacher": "mpnet-0", "val": 0.9, "val_last": 0.91},
                           {"seed": 1, "regime": "few", "teacher": "ensemble", "val": 0.93, "val_last": 0.93}]}
    few = gain.summarize(result)["regimes"]["few"]
    s = few["s"]
    assert s["best_ce"] == "ce_e20" and s["best_kd"] == "kd_lr1e3"  # 3 seeds, mean 91.33 > 86.5
    assert s["incomplete_arms"] == ["ce_one_seed", "kd_one_seed"]
    assert s["seeds"] == [1, 2] and s["gain_pt"] == pytest.approx(2.5)  # (4 + 1) / 2, seed 3 has no CE
    assert s["gain_over_self_train_pt"] == pytest.approx(round(91.33 - 85.0, 2))
    assert s["best_of_evals"]["arms"]["ce_e20"]["mean"] == pytest.approx(90.5)
    assert few["cut"]["gain_pt"] is None and list(few["cut"]["arms"]) == ["ce"]
    assert few["teacher"]["mean"] == pytest.approx(90.0) and few["teachers"]["ensemble"]["mean"] == 93.0


def test_a_variants_list_value_keeps_its_commas(gain):
    """--variants NAME:k=v,k=v splits on the commas between keys, not those inside a list value."""
    assert gain.parse_variant("mix4:distill.augment_ops=[delete,swap,mix],distill.augment=4") == (
        "mix4", ["distill.augment_ops=[delete,swap,mix]", "distill.augment=4"])
    assert gain.parse_variant("ce_lr:train.lr=5e-4,train.epochs=20") == ("ce_lr", ["train.lr=5e-4", "train.epochs=20"])


@pytest.mark.slow  # a subprocess importing transformers, peft and Trainer: 20-50 s on a shared CPU
def test_trainer_way_runs_on_lorakd_rows_and_extrapolates(tmp_path, tiny_backbone, tiny_data):
    """bench/trainer_way.py under a deadline already passed when training starts: each Trainer stops after its
    first step, and the run still evaluates and writes its JSON, with the same labelled, transfer (the rest plus
    the preset's 2 augmented copies of each labelled row) and validation rows as lorakd, phases that add up to
    the wall time, and each capped phase's missing steps added to the extrapolated time."""
    import json
    import os
    import subprocess
    import sys

    cmd = [sys.executable, str(REPO / "bench" / "trainer_way.py"), "--teacher-backbone", str(tiny_backbone),
           "--student-backbone", str(tiny_backbone), "--data", str(tiny_data), "--labelled", "100",
           "--deadline-s", "0.5", "--out", str(tmp_path), "data.max_length=32", "data.val_fraction=0.1"]
    env = dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads((tmp_path / "trainer-way-labelled100.json").read_text())
    assert out["rows"] == {"labelled": 100, "transfer": 360 - 100 + 2 * 100, "validation": 40}
    assert out["student_trainable"] > 0 and 0 <= out["teacher_acc"] <= 1 and 0 <= out["student_acc"] <= 1
    steps = {k: (p["steps"], p["full_steps"]) for k, p in out["train_phases"].items()}
    assert steps == {"teacher_train": (1, 14), "student_train": (1, 72)}  # 2 epochs of 100 / 16; 3 of 560 / 24
    phases = {k: v for k, v in out["phases_s"].items() if k != "total"}
    assert sum(phases.values()) == pytest.approx(out["wall_s"], abs=0.1)
    assert out["capped"] and all(p["full_train_s"] > p["train_s"] for p in out["train_phases"].values())
    assert out["extrapolated_full_s"] == pytest.approx(out["wall_s"] + sum(
        p["full_train_s"] - p["train_s"] for p in out["train_phases"].values()), abs=0.2)


def test_pooled_figures_are_those_of_every_run(gain):
    """--pool: an arm's runs of an earlier call (mean, sd, n) and of the raw JSONs give the mean and sample sd
    of all the runs together."""
    import statistics

    a, b = [93.65], [93.54, 93.34]
    got = gain.pooled({"mean": 93.65, "sd": None, "n": 1},
                      {"mean": statistics.mean(b), "sd": statistics.stdev(b), "n": 2})
    assert got == {"mean": round(statistics.mean(a + b), 2), "sd": round(statistics.stdev(a + b), 2), "n": 3}


def test_trainer_way_time_is_at_the_recipe_steps(gain):
    """pipeline_speedup's Trainer-way time: a capped phase's missing steps are added and a phase that ran past
    the recipe's steps has its extra ones taken off, each at the phase's steady step time."""
    peer = {"wall_s": 100.0, "recipe": {"teacher": {"train.batch_size": 16}, "student": {"train.batch_size": 24}},
            "train_phases": {"teacher_train": {"steps": 150, "full_steps": 110, "steady_samples_per_s": 160.0},
                             "student_train": {"steps": 150, "full_steps": 600, "steady_samples_per_s": 240.0}}}
    assert gain.recipe_time(peer) == pytest.approx(100 - 40 * 0.1 + 450 * 0.1)


@pytest.mark.slow  # imports transformers' Trainer
def test_trainer_way_cap_above_the_recipe_is_no_cap():
    """--max-steps above a phase's recipe steps must not replace its epochs (Trainer's max_steps would train on)."""
    spec = importlib.util.spec_from_file_location("trainer_way", REPO / "bench" / "trainer_way.py")
    way = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(way)
    from lorakd.config import TrainConfig

    t = TrainConfig(batch_size=16, epochs=2)  # 100 rows: 7 steps an epoch, 14 in all
    assert way.recipe_steps(100, t) == 14
    assert way.training_args(t, "/tmp/x", 1, 1500, 100).max_steps == -1
    assert way.training_args(t, "/tmp/x", 1, 5, 100).max_steps == 5
    assert way.training_args(t, "/tmp/x", 1, 0, 100).max_steps == -1


@pytest.mark.slow  # a `lorakd pipeline` subprocess (teacher and student) on the tiny backbone
def test_pipeline_way_times_the_pipeline_and_reads_its_folder(tmp_path, tiny_backbone, tiny_data):
    """bench/pipeline_way.py: a fresh `lorakd pipeline` process with the preset, rows and overrides the Trainer
    way reads; its JSON holds the command-to-exit time, both accuracies from the runs' eval.json and each run's
    phases, under the name pipeline_speedup pairs with trainer-way-labelled<N>.json."""
    import json
    import os
    import subprocess
    import sys

    cmd = [sys.executable, str(REPO / "bench" / "pipeline_way.py"), "--teacher-backbone", str(tiny_backbone),
           "--student-backbone", str(tiny_backbone), "--data", str(tiny_data), "--labelled", "100",
           "--out", str(tmp_path), "data.max_length=32", "data.val_fraction=0.1", "distill.augment=0",
           "train.max_steps=3", "teacher.train.max_steps=3", "train.threads=1", "teacher.train.threads=1"]
    env = dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    out = json.loads((tmp_path / "lorakd-pipeline-labelled100.json").read_text())
    assert out["regime"] == "labelled=100" and out["stages"] == {"teacher": "trained", "logits": "cached",
                                                                 "student": "trained"}
    assert 0 <= out["teacher_acc"] <= 1 and 0 <= out["student_acc"] <= 1
    phases = out["teacher_phases_s"]["total"] + out["student_phases_s"]["total"]
    assert phases < out["command_to_exit_s"]  # the process's own start and the logits come on top
    assert "data.labelled=100" in out["command"] and out["device"] == "cpu"
