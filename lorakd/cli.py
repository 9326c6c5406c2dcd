"""Command line: lorakd train | demo | eval | predict | export | params | pipeline | sweep | report | fit-budget."""
from __future__ import annotations

import argparse
import os
import sys

from . import api
from . import config as config_lib
from .yaml_files import preset_path, read_yaml
from .errors import UserError


# options that set a config key; given together with a key=value for the same key, neither silently wins
OPTION_KEYS = (("--data", "data.path"), ("--budget", "model.budget"), ("--model", "model.backbone"),
               ("--labels", "data.label_names"), ("--full-finetune", "model.full_finetune"), ("--r", "model.r"),
               ("--alpha", "model.alpha"), ("--targets", "model.targets"), ("--layers", "model.layers"))


def refuse_twice(args):
    keys = {o.split("=", 1)[0].strip() for o in getattr(args, "overrides", ())}
    for option, key in OPTION_KEYS:
        given = getattr(args, option.lstrip("-").replace("-", "_"), None)
        if given not in (None, False) and key in keys:
            raise UserError(f"{key} given twice ({option} and {key}=...): give one")


def load_config(args) -> config_lib.Config:
    return api.load_config(getattr(args, "config", None), data=getattr(args, "data", None),
                           budget=getattr(args, "budget", None), overrides=args.overrides)


def cmd_train(args):
    from . import dist

    if args.resume:
        if args.config or args.overrides or args.data or args.budget is not None or args.out:
            raise UserError("--resume takes the run's own config and folder; drop --config, --data, --budget, "
                            "--out and key=value")
        run = api.train(resume=args.resume)
    else:
        run = api.train(load_config(args), args.out)
    if dist.env()[0] == 0:
        print(f"run folder: {run.run_dir}")


def hub_demo_data() -> str:
    """hub:ag_news when `datasets` and the network are there; else a one-line error saying what to do."""
    import importlib.util

    fix = 'pass --data DIR (a folder with train.csv, e.g. ../shared/data/ag_news)'
    if importlib.util.find_spec("datasets") is None:
        raise UserError(f'lorakd demo without --data loads AG News from the hub: pip install "lorakd[hub]", or {fix}')
    offline = [k for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
               if os.environ.get(k, "").lower() in ("1", "true", "yes", "on")]
    if offline:
        raise UserError(f"lorakd demo without --data loads AG News from the hub, but {offline[0]} is set: {fix}")
    from .backbones import hub_out_of_reach

    if hub_out_of_reach():  # a 2-second check, not half a minute of retries
        raise UserError(f"lorakd demo without --data loads AG News from the hub, which is out of reach: connect, "
                        f"or {fix}")
    import datasets

    try:  # metadata only: a missing network shows in a second, before anything trains
        datasets.load_dataset_builder("fancyzhx/ag_news")
    except Exception as e:
        raise UserError(f"lorakd demo without --data: cannot reach AG News on the hub ({type(e).__name__}); "
                        f"connect, or {fix}") from None
    return "hub:ag_news"


def cmd_demo(args):
    """The reference student recipe on the embedded backbone: in full on a GPU, a few steps on a CPU."""
    import torch

    if args.cpu_steps < 1:
        raise UserError(f"--cpu-steps {args.cpu_steps}: must be at least 1")
    data = args.data or hub_demo_data()
    over = [f"data.path={data}"]
    cpu = not torch.cuda.is_available()
    if cpu:
        # a few steps learn little at the recipe's lr 2e-4: the CPU demo takes 1e-3 to show a real curve
        over += [f"train.max_steps={args.cpu_steps}", f"train.eval_every={max(1, args.cpu_steps // 3)}",
                 "train.log_every=10", "train.lr=1e-3"]
        if not args.data:  # the full split's 5% is 6,000 rows evaluated 4 times: 1% keeps the CPU demo short
            over += ["data.val_fraction=0.01"]
    cfg = config_lib.load(preset_path("agnews-minilm"), over + list(args.overrides), {"name": "demo"})
    if cpu:  # what will run, key=value overrides included
        t = cfg.train
        length = f"{t.max_steps} steps" if t.max_steps else f"{t.epochs:g} epochs"
        print(f"no GPU: {length} at lr {t.lr:g} (the reference recipe is 3 epochs at lr 2e-4, which a GPU runs "
              "in seconds)")
    run = api.train(cfg, args.out)
    accuracy = float("nan") if run.accuracy is None else run.accuracy
    print(f"{run.steps} steps in {run.train_time_s:.1f}s ({run.summary['samples_per_s']:.0f} samples/s); "
          f"validation accuracy {accuracy:.4f}")
    print(f"run folder: {run.run_dir}  (eval.json, metrics.jsonl, adapter/, plots/*.png)")


def cmd_eval(args):
    api.evaluate(args.run, args.split, device=args.device, backbone=args.backbone)


def cmd_predict(args):
    api.predict_file(args.run, args.input, args.out, device=args.device, batch_size=args.batch_size,
                     labels=args.labels, backbone=args.backbone, threads=args.threads, runtime=args.runtime,
                     scores=args.scores, layout=args.layout)


def cmd_export(args):
    api.export(args.run, args.out, adapter_only=args.adapter_only, onnx=args.onnx, backbone=args.backbone)


def cmd_params(args):
    from .budget import budget_applies, count_params, over_budget

    teacher = None
    if args.preset and args.config:
        raise UserError("give --preset or --config, not both")
    if args.labels is not None and args.labels < 2:
        raise UserError(f"--labels {args.labels}: needs at least 2")
    if args.preset or args.config:
        path = preset_path(args.preset or args.config)
        raw = read_yaml(path)
        if "teacher" in raw:  # a pipeline config: count its student, and say what its teacher trains
            from .pipeline import split_configs

            teacher, cfg = split_configs(raw, args.overrides)
        else:
            cfg = config_lib.load(path, args.overrides)
    else:
        cfg = config_lib.load(None, args.overrides)
    m = {}
    if args.model is not None:
        m["model.backbone"] = args.model
    for key in ("r", "alpha", "targets", "layers"):
        if getattr(args, key) is not None:
            m[f"model.{key}"] = getattr(args, key)
    if args.full_finetune:
        m["model.full_finetune"] = True
    if args.budget is not None:
        m["model.budget"] = args.budget
    if args.labels is not None:
        m["data.label_names"] = [f"class{i}" for i in range(args.labels)]
    cfg = config_lib.override(cfg, **m) if m else cfg
    counts = count_params(cfg.model, len(cfg.data.label_names))
    mc = cfg.model
    print(f"{mc.backbone}: {_design(mc)}, {len(cfg.data.label_names)} labels")
    print(f"{'module':<34} {'layers':>6} {'params':>12}")
    for row in counts["breakdown"]:
        print(f"{row['module']:<34} {row['layers'] if row['layers'] is not None else '':>6} {row['params']:>12,}")
    print(f"trainable {counts['trainable']:,} of {counts['total']:,} "
          f"({100 * counts['trainable'] / counts['total']:.3f}%)")
    if budget_applies(cfg):
        ok = not over_budget(cfg, counts["trainable"])
        print(f"budget {mc.budget:,}: {'within' if ok else 'OVER'} ({mc.budget - counts['trainable']:+,} left)")
    if teacher is not None:
        t = count_params(teacher.model, len(teacher.data.label_names))
        print(f"teacher (pipeline): {teacher.model.backbone}, {_design(teacher.model)}: "
              f"trainable {t['trainable']:,} of {t['total']:,}")


def _design(mc) -> str:
    """What a model config trains, in words."""
    if mc.full_finetune:
        return "full fine-tune"
    return f"LoRA r={mc.r} alpha={mc.alpha:g} on {','.join(mc.targets)}, layers {','.join(map(str, mc.layers)) or 'all'}"


def cmd_pipeline(args):
    api.pipeline(args.config, data=args.data, out=args.out, overrides=args.overrides, predict=args.predict,
                 predict_labels=args.predict_labels)


def cmd_sweep(args):
    from .sweep import run_sweep

    run_sweep(args.sweep, gpus=args.gpus, dry_run=args.dry_run, data=args.data, out=args.out,
              overrides=args.overrides)


def cmd_report(args):
    from .report import report

    report(args.paths, out_dir=args.out)


def cmd_fit_budget(args):
    from .budget import fit_budget
    from .sweep import write_fit_sweep

    props = fit_budget(budget=args.budget, backbone=args.model, targets=args.targets, num_labels=args.labels,
                       top=args.top, min_r=args.min_r, max_r=args.max_r)
    if args.write:
        write_fit_sweep(args.write, props, args.budget, args.model, args.labels)
        print(f"sweep file: {args.write} (run it with: lorakd sweep {args.write} --data PATH)")


class Parser(argparse.ArgumentParser):
    """argparse with lorakd's one-line errors (scripts grep for them); the subcommands' parsers are of this
    class too, so a bad option names its command."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .package import __version__

    p = Parser(prog="lorakd", description="Budgeted LoRA text classifiers with distillation.")
    p.add_argument("--version", action="version", version=f"lorakd {__version__}")
    sub = p.add_subparsers(dest="command")  # bare `lorakd` prints the help (main)
    _add_run_commands(sub)
    _add_design_commands(sub)
    for command in sub.choices.values():
        command.set_defaults(parser=command)
    return p


def _add_run_commands(sub):
    """train, demo, eval, predict, export: what makes and uses one run."""
    t = sub.add_parser("train", help="train one run (a student or, with role=teacher, a teacher)")
    t.add_argument("--config", help="YAML config file or preset name")
    t.add_argument("--data", help="data folder, file or hub:ag_news (sets data.path)")
    t.add_argument("--budget", type=int, help="trainable-parameter budget (sets model.budget)")
    t.add_argument("--out", help="run folder (default runs/NAME-TIMESTAMP)")
    t.add_argument("--resume", metavar="RUN", help="continue a killed run from its last checkpoint")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.r=8")
    t.set_defaults(func=cmd_train)

    d = sub.add_parser("demo", help="train + evaluate the reference student on the embedded backbone")
    d.add_argument("--data", help="AG News folder or file (default: hub:ag_news, needs lorakd[hub] and the network)")
    d.add_argument("--out", help="run folder (default runs/demo-TIMESTAMP)")
    d.add_argument("--cpu-steps", type=int, default=150,
                   help="training steps when no GPU is visible (default 150, at lr 1e-3)")
    d.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=5e-4")
    d.set_defaults(func=cmd_demo)

    e = sub.add_parser("eval", help="evaluate a finished run")
    e.add_argument("run", help="a run folder")
    e.add_argument("--split", default="validation", choices=["validation", "test"],
                   help="which split (default validation; test when the data has test.csv)")
    e.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    e.add_argument("--backbone", help="a local copy of the run's backbone")
    e.set_defaults(func=cmd_eval)

    pr = sub.add_parser("predict", help="write ID,Label predictions for unlabelled texts")
    pr.add_argument("run", help="a run folder, an exported folder (lorakd export), or an .onnx file")
    pr.add_argument("--input", required=True, help="CSV, JSONL or pickle with a text column")
    pr.add_argument("--out", required=True, help="output CSV")
    pr.add_argument("--labels", default="index", help="index (0..K-1, default), name, or charcnn (1..K)")
    pr.add_argument("--scores", action="store_true",
                    help="also each class's probability (a column per class, by name) and the top one (Score)")
    pr.add_argument("--layout", default="auto", choices=["auto", "text", "charcnn"],
                    help="a CSV without a header: auto (default: judged from its rows, refused when ambiguous), "
                         "text (one text per row) or charcnn (class,title,description)")
    pr.add_argument("--batch-size", type=int, help="default 256 (PyTorch), 8 (onnxruntime), 64 (OpenVINO)")
    pr.add_argument("--runtime", default="onnxruntime", choices=["onnxruntime", "openvino"],
                    help="where an ONNX model runs: onnxruntime (default; an export folder's int8 model) or "
                         "OpenVINO (its fp32 model.onnx, bf16 on a CPU with AMX; lorakd[openvino])")
    pr.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's / one per core)")
    pr.add_argument("--device", default="auto", help="auto, cpu, cuda (PyTorch models; ONNX runs on the CPU)")
    pr.add_argument("--backbone", help="a local copy of the run's (or adapter's) base model")
    pr.set_defaults(func=cmd_predict)

    x = sub.add_parser("export", help="a finished run as a Hugging Face folder, a peft adapter, or ONNX")
    x.add_argument("run", help="a finished run folder")
    x.add_argument("--out", help="output folder (default RUN/export, RUN/export-adapter)")
    x.add_argument("--adapter-only", action="store_true", help="a peft adapter folder instead of merged weights")
    x.add_argument("--onnx", action="store_true", help="also model.onnx (fp32) and model.int8.onnx")
    x.add_argument("--backbone", help="a local copy of the run's backbone")
    x.set_defaults(func=cmd_export)


def _add_design_commands(sub):
    """params, pipeline, sweep, report, fit-budget: counting, chaining and comparing runs."""
    c = sub.add_parser("params", help="exact trainable/total parameter counts, without weights")
    c.add_argument("--preset", help="a preset name or config file")
    c.add_argument("--config", help="a config file")
    c.add_argument("--model", help="backbone: roberta-base, roberta-large, bert-base-uncased, embedded:minilm, "
                                   "a folder or hub id")
    c.add_argument("--r", type=int, help="LoRA rank (sets model.r)")
    c.add_argument("--alpha", type=float, help="LoRA alpha (sets model.alpha; it does not change the count)")
    c.add_argument("--targets", help="comma-separated module names, e.g. query,key,value")
    c.add_argument("--layers", help="comma-separated layer indices (default all)")
    c.add_argument("--labels", type=int, help="number of classes (default: the config's, 4)")
    c.add_argument("--full-finetune", action="store_true", help="count a full fine-tune (a teacher)")
    c.add_argument("--budget", type=int, help="trainable-parameter budget to check against (sets model.budget)")
    c.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.layers=[0,5]")
    c.set_defaults(func=cmd_params)

    pl = sub.add_parser("pipeline", help="teacher -> logits -> student -> evaluation -> predictions")
    pl.add_argument("--config", required=True, help="pipeline YAML or preset name (a `teacher:` section)")
    pl.add_argument("--data", help="data folder, file or hub:ag_news (sets data.path)")
    pl.add_argument("--out", help="pipeline folder (default runs/NAME)")
    pl.add_argument("--predict", help="unlabelled input to predict at the end")
    pl.add_argument("--predict-labels", default="index", help="the predictions' labels: index (0..K-1, default), "
                                                              "name, or charcnn (1..K), as predict --labels")
    pl.add_argument("overrides", nargs="*", metavar="key=value",
                    help="config overrides: the student's, and the teacher's too where its `teacher:` section "
                         "does not set the key (data.*, train.max_steps, ...); teacher.KEY=VALUE for the teacher alone")
    pl.set_defaults(func=cmd_pipeline)

    s = sub.add_parser("sweep", help="train a grid or random sample of configs under the budget")
    s.add_argument("sweep", help="sweep YAML")
    s.add_argument("--gpus", type=int, default=1, help="run members in parallel, one per GPU")
    s.add_argument("--data", help="overrides data.path for every member")
    s.add_argument("--out", help="sweep folder (default: the sweep's own, else runs/sweep-NAME)")
    s.add_argument("--dry-run", action="store_true", help="list members and budget checks, train nothing")
    s.add_argument("--set", nargs="+", default=[], dest="overrides", metavar="key=value",
                   help="config keys set for every member, e.g. --set model.backbone=DIR train.epochs=1")
    s.set_defaults(func=cmd_sweep)

    r = sub.add_parser("report", help="results table and plots across runs and sweeps")
    r.add_argument("paths", nargs="+", help="run folders and/or sweep folders")
    r.add_argument("--out", default="report", help="output folder (default report/)")
    r.set_defaults(func=cmd_report)

    f = sub.add_parser("fit-budget", help="propose adapter placements that use the budget well")
    f.add_argument("--budget", type=int, default=1_000_000, help="trainable-parameter budget (default 1,000,000)")
    f.add_argument("--model", default="embedded:minilm", help="backbone (default embedded:minilm)")
    f.add_argument("--targets", default="query,key,value,dense",
                   help="module names to place adapters on, every subset tried (default query,key,value,dense; "
                        "MPNet: q,k,v,o,dense)")
    f.add_argument("--labels", type=int, default=4, help="number of classes (default 4)")
    f.add_argument("--top", type=int, default=15, help="how many placements to list (default 15)")
    f.add_argument("--min-r", type=int, default=1, help="smallest rank to propose (default 1)")
    f.add_argument("--max-r", type=int, help="cap the rank of proposals (default: the largest that fits)")
    f.add_argument("--write", help="write the proposals as a sweep YAML")
    f.set_defaults(func=cmd_fit_budget)


def main(argv=None):
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command is None and not unknown:  # bare `lorakd`: what it does, not an error
        parser.print_help()
        return
    # key=value overrides may come anywhere: argparse takes only the first run of positionals, so a later run
    # (`--data D model.r=8 --out X train.lr=1e-3`) comes back unknown; it follows the first, in order
    command = getattr(args, "parser", parser)
    if any(a.dest == "overrides" and not a.option_strings for a in command._actions):
        later = [u for u in unknown if "=" in u and not u.startswith("-")]
        args.overrides = list(args.overrides) + later
        unknown = [u for u in unknown if u not in later and u != "--"]  # "--" only separates
    if unknown:  # named by the command they were given to, not by lorakd's top level
        hint = " (a sweep takes overrides as --set key=value)" if args.command == "sweep" and any(
            "=" in u for u in unknown) else ""
        command.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")

    # Tokenising on every core (8,351 texts: 1.24 s -> 0.73 s on 2 cores). lorakd forks no Python process that
    # tokenises (the sweep's workers are fresh interpreters), and naming the setting keeps the tokenizers
    # library's fork warning away.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        refuse_twice(args)
        args.func(args)
        # a torchrun process that finished leaves its process group (NCCL warns otherwise); after an error
        # it just exits, so that torchrun stops the others rather than one waiting here on a peer
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except UserError as e:
        # one line whatever the message holds (a wrapped library error, say): scripts grep for it
        msg = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"lorakd: error: {msg}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("lorakd: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # the reader stopped early (`lorakd fit-budget | head`): no traceback, as Python's docs do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


def entry():
    """The `lorakd` command (and `python -m lorakd.cli`): main(), then an immediate exit once it succeeded.

    After the work is done and every file is closed, tearing down the interpreter (freeing the objects of
    torch, transformers, peft and their thousands of modules) took 3-4 s on a 2-core CPU: longer than a
    GPU run's training. os._exit skips that; errors and signals still exit through main()'s sys.exit.
    Tests call main() in-process, which returns normally."""
    import logging

    main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    entry()
