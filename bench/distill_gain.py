"""Does distillation pay? Every arm over several seeds, in one process (one GPU call):

    python bench/distill_gain.py --teacher-backbone embedded:mpnet --student-backbone embedded:minilm \
        --data ../shared/data/ag_news --seeds 42,43,44

Per seed (its own stratified train/validation split, shared by every arm of that seed) and regime
(`all`: every labelled row of the sample; `few`: 1,000 labelled rows, the rest as unlabelled text):
the teacher (a full fine-tune, trained on that regime's labels), then for each student (MiniLM r6 q/k/v,
and a budget-filling MiniLM under 1,000,000): CE only at the reference recipe, CE with more epochs
(the best of them on validation is the "tuned" twin), distilled on the labelled rows alone,
self-training on the teacher's hard labels of the transfer rows, and distilled with the transfer rows.
Prints a table; writes bench/results/distill-gain-<device>-<date>.json (every run) and
bench/results/distill-gain-summary.json (means, sd and gains in points). Results are rewritten after
every run, so a call stopped at its time limit still returns what it measured.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lorakd import atomic, distill  # noqa: E402
from lorakd import config as config_lib  # noqa: E402
from lorakd import data as data_lib  # noqa: E402
from lorakd import model as model_lib  # noqa: E402
from lorakd.train import train  # noqa: E402

STUDENTS = {  # name: overrides of the reference student (presets/agnews-minilm.yaml)
    "minilm-r6-qkv": [],
    "minilm-fill": ["model.r=23", "model.targets=[query,key,value,dense]"],  # 973,060 trainable
}
REGIMES = {  # name: (data overrides, teacher overrides, CE epochs to tune over, transfer-row overrides)
    "all": ([], ["train.epochs=2"], [10], ["distill.augment=2"]),
    "few": ([], ["train.epochs=6"], [10, 20], []),  # + data.labelled=--labelled
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher-backbone", default="embedded:mpnet")
    ap.add_argument("--student-backbone", default="embedded:minilm")
    ap.add_argument("--data", default="../shared/data/ag_news")
    ap.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=[42, 43, 44])
    ap.add_argument("--regimes", default="few,all")
    ap.add_argument("--labelled", type=int, default=1000, help="labelled rows of the few-label regime")
    ap.add_argument("--students", default=",".join(STUDENTS))
    ap.add_argument("--recipe", nargs="*", default=["distill.alpha=0.5", "distill.temperature=2"],
                    help="distillation keys of the kd arms (the presets' defaults)")
    ap.add_argument("--variants", nargs="*", default=[],
                    help="extra kd_transfer arms, each NAME:key=value,key=value")
    ap.add_argument("--skip-tuned", action="store_true", help="no longer-trained CE arms")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--deadline-s", type=float, default=0, help="start no new run after this many seconds")
    ap.add_argument("--tag", default="", help="suffix of the raw JSON (several processes side by side)")
    ap.add_argument("--merge", nargs="*", help="only merge these raw JSONs into the summary")
    ap.add_argument("--set", nargs="*", default=[], metavar="key=value", help="overrides for every run (smoke tests)")
    args = ap.parse_args()
    out = Path(args.out)
    if args.merge:
        return merge(args.merge, out)
    t_start = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="lorakd-gain-"))
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    import transformers

    result = {"device": dev, "date": date.today().isoformat(), "torch": torch.__version__,
              "transformers": transformers.__version__,
              "seeds": [], "recipe": args.recipe, "runs": [], "teachers": [], "logits": []}
    raw_path = out / f"distill-gain-{dev.replace(' ', '_')}-{result['date']}{args.tag}.json"
    quiet = lambda *a, **k: None  # noqa: E731
    variants = [(v.split(":", 1)[0], v.split(":", 1)[1].split(",")) for v in args.variants]
    base_student = str(config_lib.preset_path("agnews-minilm"))

    def run(name, over, path):
        if args.deadline_s and time.time() - t_start > args.deadline_s:
            raise TimeoutError(name)
        cfg = config_lib.load(path, [f"data.path={args.data}", *over, *args.set])
        s = train(cfg, tmp / name, log=quiet)
        return s

    try:
        for seed in args.seeds:
            result["seeds"].append(seed)
            one_seed(args, seed, run, result, raw_path, tmp, quiet, variants, base_student)
    except TimeoutError as e:
        print(f"deadline: stopped before {e}", flush=True)
    atomic.write_json(raw_path, result)
    summary = summarize(result)
    atomic.write_json(out / f"distill-gain-summary{args.tag}.json", summary)
    print_summary(summary)
    print(f"wrote {raw_path} in {time.time() - t_start:.0f}s")


def merge(paths, out):
    """One summary from the raw results of several processes (seeds run side by side)."""
    import json

    results = [json.loads(Path(p).read_text()) for p in paths]
    merged = dict(results[0], seeds=sorted({s for r in results for s in r["seeds"]}))
    for key in ("runs", "teachers", "logits"):  # a seed's teacher run twice (two calls) counts once
        rows = [x for r in results for x in r[key]]
        merged[key] = rows if key == "runs" else list({(x["seed"], x["regime"]): x for x in rows}.values())
    summary = summarize(merged)
    atomic.write_json(out / "distill-gain-summary.json", summary)
    print_summary(summary)


def one_seed(args, seed, run, result, raw_path, tmp, quiet, variants, base_student):
    """Teacher, transfer-row logits and every student arm of one seed, in each regime."""
    for regime in args.regimes.split(","):
        data_over, teacher_over, tune_epochs, transfer_over = REGIMES[regime]
        common = [f"train.seed={seed}", *data_over] + ([f"data.labelled={args.labelled}"] if regime == "few" else [])
        tdir = f"teacher-{regime}-{seed}"
        t0 = time.time()
        ts = run(tdir, [f"model.backbone={args.teacher_backbone}", *common, *teacher_over],
                 config_lib.preset_path("mpnet-teacher"))
        result["teachers"].append({"seed": seed, "regime": regime, "val": ts["validation_accuracy"],
                                   "train_time_s": ts["train_time_s"], "samples_per_s": ts["samples_per_s"],
                                   "graph_capture_s": ts["graph_capture_s"], "cuda_graphs": ts["cuda_graphs"],
                                   "wall_s": round(time.time() - t0, 1)})
        print(result["teachers"][-1], flush=True)
        kd = [f"distill.teachers=[{tmp / tdir}]", *args.recipe]
        # the transfer rows' logits: computed once (timed), then every arm reads the cache
        cfg = config_lib.load(base_student, [f"data.path={args.data}", f"model.backbone={args.student_backbone}",
                                             *common, *kd, *transfer_over, *args.set])
        splits = data_lib.load_splits(cfg.data, seed)
        tok = model_lib.load_tokenizer(cfg.model.backbone)
        dev_t = model_lib.pick_device("auto")
        times = []
        for _ in range(2):
            t0 = time.time()
            rows, _ = distill.student_rows(cfg, dict(splits), dev_t, quiet, tok)
            times.append(round(time.time() - t0, 2))
        result["logits"].append({"seed": seed, "regime": regime, "rows": len(rows), "computed_s": times[0],
                                 "cached_s": times[1]})
        for student in args.students.split(","):
            base = [f"model.backbone={args.student_backbone}", *common, *STUDENTS[student]]
            transfer = kd + transfer_over
            arms = [("ce", []), ("kd_transfer", transfer),  # the key arms first: a deadline cuts the rest
                    ("self_train", transfer + ["distill.transfer_targets=hard", "distill.alpha=1"])]
            if not args.skip_tuned:
                arms += [(f"ce_e{e}", [f"train.epochs={e}"]) for e in tune_epochs]
            arms += [("kd_labelled", kd + ["distill.rest_as_transfer=false"])]
            arms += [(f"kd_{n}", transfer + o) for n, o in variants]
            for arm, over in arms:
                name = f"{regime}-{student}-{arm}-{seed}"
                t0 = time.time()
                s = run(name, base + over, base_student)
                result["runs"].append({"seed": seed, "regime": regime, "student": student, "arm": arm,
                                       "val": s["validation_accuracy"], "steps": s["steps"],
                                       "train_time_s": s["train_time_s"], "wall_s": round(time.time() - t0, 1)})
                print(result["runs"][-1], flush=True)
                atomic.write_json(raw_path, result)
    atomic.write_json(raw_path, result)


def mean_sd(values):
    return {"mean": round(100 * statistics.mean(values), 2),
            "sd": round(100 * statistics.stdev(values), 2) if len(values) > 1 else None, "n": len(values)}


def summarize(result):
    """Per regime and student: each arm's mean/sd (validation, in %), the tuned CE twin, and the gains."""
    out = {"device": result["device"], "date": result["date"], "seeds": result["seeds"], "regimes": {}}
    teachers = {}
    for t in result["teachers"]:
        teachers.setdefault(t["regime"], []).append(t["val"])
    for r in result["runs"]:
        reg = out["regimes"].setdefault(r["regime"], {})
        reg.setdefault(r["student"], {}).setdefault("_vals", {}).setdefault(r["arm"], {})[r["seed"]] = r["val"]
    for regime, students in out["regimes"].items():
        for student, entry in students.items():
            vals = entry.pop("_vals")
            arms = {arm: mean_sd(list(v.values())) for arm, v in vals.items()}
            ce_arms = [a for a in arms if a == "ce" or a.startswith("ce_e")]
            kd_arms = [a for a in arms if a.startswith("kd_") and a != "kd_labelled"] or ["kd_labelled"]
            best_ce = max(ce_arms, key=lambda a: arms[a]["mean"])
            best_kd = max(kd_arms, key=lambda a: arms[a]["mean"])
            paired = sorted(set(vals[best_kd]) & set(vals[best_ce]))  # gains over the seeds both arms ran
            gains = [100 * (vals[best_kd][s] - vals[best_ce][s]) for s in paired]
            entry.update(arms=arms, best_ce=best_ce, best_kd=best_kd, seeds=paired,
                         gain_pt=round(statistics.mean(gains), 2) if gains else None,
                         gain_pt_sd=round(statistics.stdev(gains), 2) if len(gains) > 1 else None,
                         gain_over_reference_ce_pt=round(arms[best_kd]["mean"] - arms["ce"]["mean"], 2))
            if "self_train" in arms:
                entry["gain_over_self_train_pt"] = round(arms[best_kd]["mean"] - arms["self_train"]["mean"], 2)
        if regime in teachers:
            students["teacher"] = mean_sd(teachers[regime])
    return out


def print_summary(summary):
    for regime, students in summary["regimes"].items():
        t = students.get("teacher", {})
        print(f"\nregime {regime}: teacher {t.get('mean')} (sd {t.get('sd')})")
        for student, e in students.items():
            if student == "teacher" or "arms" not in e:
                continue
            print(f"  {student}: gain {e['gain_pt']} pt (sd {e['gain_pt_sd']}; {e['best_kd']} over {e['best_ce']}, "
                  f"seeds {e['seeds']})")
            for arm, m in e["arms"].items():
                print(f"    {arm:<24} {m['mean']:6.2f}  sd {m['sd']}")


if __name__ == "__main__":
    main()
