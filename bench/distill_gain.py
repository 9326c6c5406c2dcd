"""Does distillation pay? Every arm over several seeds, in one process (one GPU call):

    python bench/distill_gain.py --teacher-backbone embedded:mpnet --student-backbone embedded:minilm \
        --data ../shared/data/ag_news --seeds 42,43,44

Per seed (its own stratified train/validation split, shared by every arm of that seed) and regime
(`all`: every labelled row of the sample; `few`: 1,000 labelled rows, the rest as unlabelled text):
the teacher (a full fine-tune, trained on that regime's labels), then for each student (MiniLM r6 q/k/v,
and a budget-filling MiniLM under 1,000,000): CE only at the reference recipe, CE with more epochs
(the best of them on validation is the "tuned" twin), distilled on the labelled rows alone,
self-training on the teacher's hard labels of the transfer rows, and distilled with the transfer rows.
--teachers K trains K teachers per seed (init seeds differ, the split does not: data.split_seed) and adds the
ensemble's arms; --round2 adds a teacher that learns from that ensemble over every row (arm kd_r2); --chain adds
an assistant teacher (the mpnet-r6-qkv LoRA student, distilled from the teacher over every row) that teaches arms
kd_chain / self_train_chain; --variants adds arms of other keys (student lr, say; --variants-teacher: whose). Arms are compared on each run's
last validation evaluation (see summarize). Side by side on a 2-GPU host: bench/device_distill.sh. Prints a table; writes bench/results/scratch/distill-gain[TAG]-<device>-<time>.json (every run) and
bench/results/distill-gain-summary.json (means, sd and gains in points). Results are rewritten after
every run, so a call stopped at its time limit still returns what it measured.
"""
from __future__ import annotations

import argparse
import math
import re
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
sys.path.insert(0, str(ROOT / "bench"))
from result_files import RESULTS, result_paths  # noqa: E402
from lorakd import config as config_lib  # noqa: E402
from lorakd import data as data_lib  # noqa: E402
from lorakd import backbones  # noqa: E402
from lorakd import graphs  # noqa: E402
from lorakd.runs import read_metrics  # noqa: E402
from lorakd.train import train  # noqa: E402
from lorakd.yaml_files import preset_path  # noqa: E402

STUDENTS = {  # name: overrides of the reference student (preset agnews-minilm); {teacher}: --teacher-backbone
    "minilm-r6-qkv": [],
    "minilm-fill": ["model.r=23", "model.targets=[query,key,value,dense]"],  # 973,060 trainable
    # the reference design's shape on the teacher's own base-size backbone (925,444 trainable): opt in with --students
    "mpnet-r6-qkv": ["model.backbone={teacher}", "model.targets=[q,k,v]"],
}
REGIMES = {  # name: (data overrides, teacher overrides, CE epochs to tune over, transfer-row overrides,
    #              overrides of the round-2 teacher, which trains on the labelled rows + the transfer rows)
    "all": ([], ["train.epochs=2"], [10], ["distill.augment=2"], ["train.epochs=1"]),
    "few": ([], ["train.epochs=6"], [10, 20, 40], [], ["train.epochs=2"]),  # + data.labelled=--labelled
    # the 50,754-row file (issue 30): every row labelled, 8,791 labelled, 1,000 labelled; the rest transfer rows
    "50k-all": ([], ["train.epochs=2"], [6], [], ["train.epochs=1"]),
    "50k-8791": (["data.labelled=8791"], ["train.epochs=2"], [9], [], ["train.epochs=1"]),
    "50k-1000": (["data.labelled=1000"], ["train.epochs=6"], [10, 30], [], ["train.epochs=1"]),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher-backbone", default="embedded:mpnet")
    ap.add_argument("--student-backbone", default="embedded:minilm")
    ap.add_argument("--data", default="../shared/data/ag_news")
    ap.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=[42, 43, 44])
    ap.add_argument("--regimes", default="few,all")
    ap.add_argument("--labelled", type=int, default=1000, help="labelled rows of the few-label regime")
    ap.add_argument("--students", default="minilm-r6-qkv,minilm-fill", help=f"of {', '.join(STUDENTS)}")
    ap.add_argument("--recipe", nargs="*", default=["distill.alpha=0.5", "distill.temperature=2"],
                    help="distillation keys of the kd arms (the presets' defaults)")
    ap.add_argument("--variants", nargs="*", default=[],
                    help="extra arms, each NAME:key=value,key=value: kd_NAME on top of kd_transfer, a CE-only "
                         "arm when NAME starts with ce_ (a CE twin tuned otherwise), or a self-training arm when "
                         "it starts with self_train")
    ap.add_argument("--variants-teacher", default="teacher", choices=["teacher", "ens", "r2", "chain"],
                    help="which teacher the kd_/self_train variants learn from (chain needs --chain, ...)")
    ap.add_argument("--kd-set", nargs="*", default=[], metavar="key=value",
                    help="overrides for every arm that learns from a teacher (kd_*, self_train*), before --variants' "
                         "own: the student lr that measured best with soft targets, say (CE arms keep theirs)")
    ap.add_argument("--skip-tuned", action="store_true", help="no longer-trained CE arms")
    ap.add_argument("--teachers", type=int, default=1,
                    help="mpnet teachers per seed (seeds s, s+1000, ...): >1 adds the ensemble arms kd_ens, self_train_ens; "
                         "0 runs the CE arms alone")
    ap.add_argument("--round2", action="store_true",
                    help="also a round-2 teacher, distilled from the ensemble over labelled + transfer rows (arm kd_r2)")
    ap.add_argument("--chain", action="store_true",
                    help="also an assistant teacher: the mpnet-r6-qkv LoRA student distilled from the teacher(s) over "
                         "every row (it can beat its teacher with few labels), teaching arms kd_chain, self_train_chain")
    ap.add_argument("--chain-set", nargs="*", default=["train.lr=5e-4"], metavar="key=value",
                    help="the assistant's overrides (default: the lr that measured best for that student)")
    ap.add_argument("--arms", default="", help="only these student arms (comma-separated; default: all); "
                    "STUDENT:ARM runs that arm for that student alone")
    ap.add_argument("--student-set", nargs="*", default=[], metavar="STUDENT:key=value",
                    help="overrides of one student's every arm, after the arm's own (its lr, say)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--deadline-s", type=float, default=0, help="start no new run after this many seconds")
    ap.add_argument("--tag", default="", help="suffix of the raw JSON (several processes side by side)")
    ap.add_argument("--merge", nargs="*", help="only merge these raw JSONs into the summary")
    ap.add_argument("--set", nargs="*", default=[], metavar="key=value", help="overrides for every run (smoke tests)")
    ap.add_argument("--scale-summary", action="store_true",
                    help="with --merge: also write distill-scale-summary.json (issue 30's regimes, best student each)")
    ap.add_argument("--prior", help="with --scale-summary: a scale summary whose arms and teachers that the merged "
                                    "raw JSONs lack are kept as they are (mean, sd, n of an earlier call)")
    ap.add_argument("--pool", nargs="*", default=[], metavar="REGIME:STUDENT:ARM",
                    help="with --prior: these arms' prior figures are runs of other seeds than the raw JSONs': "
                         "pool the two (mean and sd of every run) instead of keeping only the raw ones")
    args = ap.parse_args()
    out = Path(args.out)
    if args.merge:
        return merge(args.merge, out, args.scale_summary, args.students, args.prior, args.pool)
    t_start = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="lorakd-gain-"))
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    import transformers

    result = {"device": dev, "date": date.today().isoformat(), "torch": torch.__version__,
              "transformers": transformers.__version__,
              "seeds": [], "recipe": args.recipe, "kd_set": args.kd_set, "runs": [], "teachers": [], "logits": []}
    raw_path = result_paths(f"distill-gain{args.tag}", out, dev)[1]  # the runs: scratch; the summary is current
    quiet = lambda *a, **k: None  # noqa: E731
    variants = [parse_variant(v) for v in args.variants]
    base_student = str(preset_path("agnews-minilm"))

    def run(name, over, path):
        if args.deadline_s and time.time() - t_start > args.deadline_s:
            raise TimeoutError(name)
        cfg = config_lib.load(path, [f"data.path={args.data}", *over, *args.set])
        s = train(cfg, tmp / name, log=quiet)
        evals = [m["accuracy"] for m in read_metrics(tmp / name) if m.get("split") == "validation"]
        s["val_last"], s["evals"] = (evals[-1], len(evals)) if evals else (s["validation_accuracy"], 1)
        return s

    try:
        for seed in args.seeds:
            result["seeds"].append(seed)
            one_seed(args, seed, run, result, raw_path, tmp, quiet, variants, base_student)
    except TimeoutError as e:
        print(f"deadline: stopped before {e}", flush=True)
    atomic.write_json(raw_path, result)
    summary = summarize(result)
    if not args.tag:  # side-by-side processes: one summary from all of them (--merge) instead
        atomic.write_json(out / "distill-gain-summary.json", summary)
    print_summary(summary)
    print(f"wrote {raw_path} in {time.time() - t_start:.0f}s")


def parse_variant(text):
    """NAME:key=value,key=value -> (NAME, [key=value, ...]); a comma inside [...] belongs to a list value."""
    name, _, keys = text.partition(":")
    return name, re.split(r",(?![^\[]*\])", keys)


def merge(paths, out, scale=False, students="", prior=None, pool=()):
    """One summary from the raw results of several processes (seeds run side by side, or calls one after
    another: a CE-only call and a teachers' call of the same seeds)."""
    import json

    results = [json.loads(Path(p).read_text()) for p in paths]
    merged = dict(results[0], seeds=sorted({s for r in results for s in r["seeds"]}))
    for key in ("runs", "teachers", "logits"):  # a seed's teacher run twice (two calls) counts once
        rows = [x for r in results for x in r[key]]
        merged[key] = rows if key == "runs" else list({(x["seed"], x["regime"], x.get("teacher")): x
                                                       for x in rows}.values())
    summary = summarize(merged)
    if scale:
        scaled = scale_summary(summary, students.split(","), json.loads(Path(prior).read_text()) if prior else None,
                               pool)
        atomic.write_json(out / "distill-scale-summary.json", scaled)
        print(json.dumps(scaled, indent=1))
        return
    atomic.write_json(out / "distill-gain-summary.json", summary)
    print_summary(summary)


def pooled(a, b):
    """Mean, sd and n of two groups of runs given as mean/sd/n (in %): the sd of all the runs together."""
    n = a["n"] + b["n"]
    mean = (a["n"] * a["mean"] + b["n"] * b["mean"]) / n
    ss = sum((g["n"] - 1) * (g["sd"] or 0) ** 2 + g["n"] * (g["mean"] - mean) ** 2 for g in (a, b))
    return {"mean": round(mean, 2), "sd": round(math.sqrt(ss / (n - 1)), 2), "n": n}


def scale_summary(summary, students, prior=None, pool=()):
    """Issue 30's figures per regime: the round-one teacher, the best student arm under the budget (a KD arm or
    a CE arm, by mean among the arms run on the most seeds, up to 2), its best KD arm's gain over the same
    student's best CE arm, and the seeds; plus every arm's mean/sd/n. With `prior` (an earlier scale summary):
    the arms and teachers the raw results lack are kept from it, and the `pool` arms' runs are pooled with it."""
    from lorakd.budget import count_params

    out = {"metric": summary["metric"], "device": summary["device"], "regimes": {}}
    for regime in sorted(set(summary["regimes"]) | set((prior or {}).get("regimes", {}))):
        entry, old = summary["regimes"].get(regime, {}), (prior or {}).get("regimes", {}).get(regime, {})
        arms = {s: {**old.get("arms", {}).get(s, {}), **entry.get(s, {}).get("arms", {})} for s in students}
        for s, a in ((s, a) for s in students for a in entry.get(s, {}).get("arms", {})):
            if f"{regime}:{s}:{a}" in pool and a in old.get("arms", {}).get(s, {}):
                arms[s][a] = pooled(old["arms"][s][a], entry[s]["arms"][a])
        arms = {s: a for s, a in arms.items() if a}
        if not arms:
            continue
        most = min(2, max(m["n"] for a in arms.values() for m in a.values()))
        best = max(((s, a, m) for s, a_ in arms.items() for a, m in a_.items() if m["n"] >= most),
                   key=lambda x: x[2]["mean"])
        student, arm, m = best
        over = [o.format(teacher="embedded:mpnet") for o in STUDENTS[student]]
        cfg = config_lib.load(preset_path("agnews-minilm"), over)
        own = arms[student]
        ce = max((a for a in own if a == "ce" or a.startswith("ce_")), key=lambda a: own[a]["mean"], default=None)
        kd = max((a for a in own if a.startswith("kd_")), key=lambda a: own[a]["mean"], default=None)
        out["regimes"][regime] = {
            "teacher": entry.get("teacher") or old.get("teacher"),
            "other_teachers": {**old.get("other_teachers", {}), **entry.get("teachers", {})},
            "best_student": {"name": f"{student} {arm}", "trainable": count_params(cfg.model, 4)["trainable"],
                             "accuracy_mean": m["mean"], "accuracy_sd": m["sd"], "n": m["n"]},
            "best_ce": {"name": f"{student} {ce}", **own[ce]} if ce else None,
            "best_kd": {"name": f"{student} {kd}", **own[kd]} if kd else None,
            "gain_over_ce_pt": round(own[kd]["mean"] - own[ce]["mean"], 2) if kd and ce else None,
            "seeds": sorted({*summary["seeds"], *old.get("seeds", [])}),  # each arm's own count is its n
            "arms": arms}
    out["pipeline_speedup"] = pipeline_speedup(RESULTS)
    return out


def pipeline_speedup(folder):
    """Per regime: `lorakd pipeline`'s command-to-exit time against the Trainer way's (bench/trainer_way.py; its
    full time extrapolated where its steps were capped), with both arms' accuracies."""
    import json

    out = {}
    for peer_path in sorted(Path(folder).glob("trainer-way-labelled*.json")):
        ours_path = peer_path.with_name(peer_path.name.replace("trainer-way", "lorakd-pipeline"))
        if not ours_path.exists():
            continue
        peer, ours = json.loads(peer_path.read_text()), json.loads(ours_path.read_text())
        peer_s = recipe_time(peer)
        out[peer["regime"]] = {"lorakd_s": ours["command_to_exit_s"], "trainer_way_s": peer_s,
                               "trainer_way_capped": bool(peer.get("capped")),
                               "trainer_way_measured_s": peer["wall_s"],
                               "speedup": round(peer_s / ours["command_to_exit_s"], 2),
                               "teacher_acc": {"lorakd": ours["teacher_acc"], "trainer_way": peer["teacher_acc"]},
                               "student_acc": {"lorakd": ours["student_acc"], "trainer_way": peer["student_acc"]}}
    return out


def recipe_time(peer) -> float:
    """The Trainer way's wall time at its recipe's steps: each phase's steps short of the recipe's (a capped run)
    added, or past them subtracted (a cap above the recipe's steps lengthened training before 2026-12-04's fix
    of trainer_way.py), at the phase's steady per-step time."""
    extra = 0.0
    for name, ph in peer["train_phases"].items():
        batch = peer["recipe"][name.removesuffix("_train")]["train.batch_size"]
        extra += (ph["full_steps"] - ph["steps"]) * batch / ph["steady_samples_per_s"]
    return round(peer["wall_s"] + extra, 1)


def one_seed(args, seed, run, result, raw_path, tmp, quiet, variants, base_student):
    """Teachers, transfer-row logits and every student arm of one seed, in each regime."""
    for regime in args.regimes.split(","):
        data_over, teacher_over, tune_epochs, transfer_over, round2_over = REGIMES[regime]
        common = [f"train.seed={seed}", *data_over] + ([f"data.labelled={args.labelled}"] if regime == "few" else [])
        teacher_preset = preset_path("mpnet-teacher")
        tdirs = []
        for k in range(args.teachers):  # teacher k trains with seed + 1000k on the same split (data seed fixed)
            tdir = tmp / f"teacher-{regime}-{seed}-{k}"
            over = [f"model.backbone={args.teacher_backbone}", *common, *teacher_over]
            if k:
                over += [f"train.seed={seed + 1000 * k}", f"data.split_seed={seed}"]
            t0 = time.time()
            ts = run(tdir.name, over, teacher_preset)
            tdirs.append(tdir)
            record_teacher(result, seed, regime, f"mpnet-{k}", ts, t0)
        if not tdirs:  # --teachers 0: a CE twin's tuning needs no teacher, only the CE arms run
            kd = kd_ens = ["distill.teachers=[]"]
        else:
            kd = [f"distill.teachers=[{tdirs[0]}]", *args.recipe]
            kd_ens = [f"distill.teachers=[{','.join(map(str, tdirs))}]", *args.recipe]
        dev_t, tok = graphs.pick_device("auto"), backbones.load_tokenizer(args.student_backbone)

        def student_cfg(over):
            return config_lib.load(base_student, [f"data.path={args.data}", f"model.backbone={args.student_backbone}",
                                                  *common, *over, *transfer_over, *args.set])

        splits = data_lib.load_splits(student_cfg(kd).data, seed) if tdirs else None
        if len(tdirs) > 1:  # the ensemble's own validation accuracy (averaged probabilities, T = 1)
            cfg = student_cfg(kd_ens + ["distill.temperature=1"])
            probs = distill.soft_targets(cfg, [splits["validation"]], dev_t, quiet)
            acc = float((probs.argmax(-1).cpu().numpy() == splits["validation"].labels).mean())
            result["teachers"].append({"seed": seed, "regime": regime, "teacher": "ensemble", "val": acc,
                                       "val_last": acc, "members": len(tdirs)})
            print(result["teachers"][-1], flush=True)
        if args.round2:  # the teacher trains again, on its ensemble's soft targets over labelled + transfer rows
            t0 = time.time()
            r2 = tmp / f"teacher-{regime}-{seed}-r2"
            ts = run(r2.name, [f"model.backbone={args.teacher_backbone}", *common, *teacher_over, *kd_ens,
                               *transfer_over, *round2_over], teacher_preset)
            record_teacher(result, seed, regime, "round2", ts, t0)
        if args.chain:  # the assistant: a LoRA student of the teacher's backbone, distilled over every row
            t0 = time.time()
            chain = tmp / f"assistant-{regime}-{seed}"
            ts = run(chain.name, [*(o.format(teacher=args.teacher_backbone) for o in STUDENTS["mpnet-r6-qkv"]),
                                  *common, *kd_ens, *transfer_over, *args.chain_set], base_student)
            record_teacher(result, seed, regime, "chain", ts, t0)
        # the transfer rows' logits: computed once (timed), then every arm reads the cache
        times = []
        for _ in range(2 if tdirs else 0):
            t0 = time.time()
            rows, _ = distill.student_rows(student_cfg(kd), dict(splits), dev_t, quiet, tok)
            times.append(round(time.time() - t0, 2))
        if times:
            result["logits"].append({"seed": seed, "regime": regime, "rows": len(rows), "computed_s": times[0],
                                     "cached_s": times[1]})
        hard = ["distill.transfer_targets=hard", "distill.alpha=1"]
        transfer, taught = kd + transfer_over, args.kd_set  # taught: every arm that learns from a teacher
        others = []  # (name, distillation keys) of the other teachers; each teaches a kd_ and a self_train_ arm
        if len(tdirs) > 1:
            others += [("ens", kd_ens + transfer_over)]
        if args.round2:
            others += [("r2", [f"distill.teachers=[{r2}]", *args.recipe, *transfer_over])]
        if args.chain:
            others += [("chain", [f"distill.teachers=[{chain}]", *args.recipe, *transfer_over])]
        arms = [("ce", []), ("kd_transfer", transfer + taught)]  # the key arms first: a deadline cuts the rest
        arms += [(f"kd_{name}", over + taught) for name, over in others]
        arms += [("self_train", transfer + hard + taught)]
        arms += [(f"self_train_{name}", over + hard + taught) for name, over in others]
        if not args.skip_tuned:
            arms += [(f"ce_e{e}", [f"train.epochs={e}"]) for e in tune_epochs]
        arms += [("kd_labelled", kd + ["distill.rest_as_transfer=false"] + taught)]
        if args.variants_teacher != "teacher" and args.variants_teacher not in dict(others):
            raise SystemExit(f"--variants-teacher {args.variants_teacher}: that teacher is not trained in this run")
        teach = dict(others).get(args.variants_teacher, transfer)
        arms += [(n, o) if n.startswith("ce_") else (n, teach + hard + taught + o) if n.startswith("self_train")
                 else (f"kd_{n}", teach + taught + o) for n, o in variants]
        wanted = args.arms.split(",") if args.arms else []
        if wanted:
            arms = [a for a in arms if a[0] in wanted or any(w.endswith(f":{a[0]}") for w in wanted)]
        if not tdirs:
            arms = [a for a in arms if a[0] == "ce" or a[0].startswith("ce_")]
        for arm, over in arms:  # each arm for every student before the next arm: a deadline cuts arms, not students
            for student in args.students.split(","):
                if wanted and arm not in wanted and f"{student}:{arm}" not in wanted:
                    continue
                own = [o.split(":", 1)[1] for o in args.student_set if o.split(":", 1)[0] == student]
                base = [f"model.backbone={args.student_backbone}", *common,
                        *(o.format(teacher=args.teacher_backbone) for o in STUDENTS[student])]
                name = f"{regime}-{student}-{arm}-{seed}"
                t0 = time.time()
                s = run(name, base + over + own, base_student)
                result["runs"].append({"seed": seed, "regime": regime, "student": student, "arm": arm,
                                       "val": s["validation_accuracy"], "val_last": s["val_last"],
                                       "evals": s["evals"], "steps": s["steps"],
                                       "train_time_s": s["train_time_s"], "wall_s": round(time.time() - t0, 1)})
                print(result["runs"][-1], flush=True)
                atomic.write_json(raw_path, result)
    atomic.write_json(raw_path, result)


def record_teacher(result, seed, regime, name, ts, t0):
    result["teachers"].append({"seed": seed, "regime": regime, "teacher": name, "val": ts["validation_accuracy"],
                               "val_last": ts["val_last"], "train_time_s": ts["train_time_s"],
                               "samples_per_s": ts["samples_per_s"], "graph_capture_s": ts["graph_capture_s"],
                               "cuda_graphs": ts["cuda_graphs"], "wall_s": round(time.time() - t0, 1)})
    print(result["teachers"][-1], flush=True)


def mean_sd(values):
    return {"mean": round(100 * statistics.mean(values), 2),
            "sd": round(100 * statistics.stdev(values), 2) if len(values) > 1 else None, "n": len(values)}


def summarize(result):
    """Per regime and student: each arm's mean/sd (validation, in %), the tuned CE twin, and the gains.

    The headline metric is each run's last validation evaluation (`val_last`): arms differ in their number of
    evaluations (CE 20 epochs evaluates 20 times, KD 3 times), so the best of them would favour the longer arm.
    The best-of-evaluations figures (the checkpoint a run keeps) are under `best_of_evals`."""
    out = {"device": result["device"], "date": result["date"], "seeds": result["seeds"],
           "metric": "last validation evaluation of each run (no checkpoint selection)", "regimes": {}}
    for r in result["runs"]:
        reg = out["regimes"].setdefault(r["regime"], {})
        entry = reg.setdefault(r["student"], {"_vals": {}, "_best": {}})
        entry["_vals"].setdefault(r["arm"], {})[r["seed"]] = r.get("val_last", r["val"])
        entry["_best"].setdefault(r["arm"], {})[r["seed"]] = r["val"]
    for regime, students in out["regimes"].items():
        for student, entry in students.items():
            vals, best = entry.pop("_vals"), entry.pop("_best")
            entry.update(gains(vals))
            entry["best_of_evals"] = gains(best)
        teachers = {}
        for t in result["teachers"]:
            if t["regime"] == regime:
                teachers.setdefault(t.get("teacher", "mpnet-0"), []).append(t.get("val_last", t["val"]))
        if teachers:
            students["teacher"] = mean_sd(teachers.pop("mpnet-0", teachers.get("ensemble", [0.0])))
            students["teachers"] = {name: mean_sd(v) for name, v in teachers.items()}
    return out


def gains(vals):
    """vals: {arm: {seed: accuracy}} -> arm means/sd and the best KD arm's gains over the best CE arm and over
    self-training, paired by seed."""
    arms = {arm: mean_sd(list(v.values())) for arm, v in vals.items()}
    # the best arms are picked among those run on every seed the reference CE arm ran (each seed runs it first):
    # a one-seed arm's mean says more about its seed's split than about the arm
    pool = [a for a in arms if set(vals[a]) >= set(vals.get("ce", {}))]
    ce_arms = [a for a in pool if a == "ce" or a.startswith("ce_")]
    kd_arms = [a for a in pool if a.startswith("kd_") and a != "kd_labelled"] or [a for a in pool if a == "kd_labelled"]
    if not ce_arms or not kd_arms:  # a deadline cut this student short: arms only, no gain
        return dict(arms=arms, gain_pt=None)
    best_ce = max(ce_arms, key=lambda a: arms[a]["mean"])
    best_kd = max(kd_arms, key=lambda a: arms[a]["mean"])
    paired = sorted(set(vals[best_kd]) & set(vals[best_ce]))  # gains over the seeds both arms ran
    diffs = [100 * (vals[best_kd][s] - vals[best_ce][s]) for s in paired]
    out = dict(arms=arms, best_ce=best_ce, best_kd=best_kd, seeds=paired,
               incomplete_arms=sorted(set(arms) - set(pool)),  # not run on every seed: not picked as best
               gain_pt=round(statistics.mean(diffs), 2) if diffs else None,
               gain_pt_sd=round(statistics.stdev(diffs), 2) if len(diffs) > 1 else None,
               gain_over_reference_ce_pt=round(arms[best_kd]["mean"] - arms["ce"]["mean"], 2) if "ce" in arms else None)
    self_arms = [a for a in pool if a.startswith("self_train")]
    if self_arms:
        best_self = max(self_arms, key=lambda a: arms[a]["mean"])
        out.update(best_self_train=best_self,
                   gain_over_self_train_pt=round(arms[best_kd]["mean"] - arms[best_self]["mean"], 2))
    return out


def print_summary(summary):
    print(f"\nmetric: {summary['metric']}")
    for regime, students in summary["regimes"].items():
        t = students.get("teacher", {})
        print(f"\nregime {regime}: teacher {t.get('mean')} (sd {t.get('sd')})")
        for name, m in students.get("teachers", {}).items():
            print(f"  teacher {name}: {m['mean']} (sd {m['sd']})")
        for student, e in students.items():
            if student in ("teacher", "teachers") or "arms" not in e:
                continue
            if e["gain_pt"] is None:
                print(f"  {student}: cut short; arms {sorted(e['arms'])}")
                continue
            print(f"  {student}: gain {e['gain_pt']} pt (sd {e['gain_pt_sd']}; {e['best_kd']} over {e['best_ce']}, "
                  f"seeds {e['seeds']})")
            best = e["best_of_evals"]["arms"]
            print(f"    {'arm':<24} {'last':>6}  {'sd':>5}  {'best-of-evals':>13}")
            for arm, m in e["arms"].items():
                print(f"    {arm:<24} {m['mean']:6.2f}  {m['sd'] or 0:5.2f}  {best[arm]['mean']:13.2f}")


if __name__ == "__main__":
    main()
