"""Report across runs and sweeps, on hand-written run folders (no training: fast)."""
import csv
import html
import json
import re
import shutil
import subprocess

import pytest

from lorakd import config
from lorakd.errors import UserError
from lorakd.report import differing_keys, collect, report


def fake_run(folder, r, val, status="done", test=None, steps=(10, 20), **keys):
    """A run folder as train() leaves it: config.yaml, run.json, metrics.jsonl, eval.json; keys: dotted config
    keys besides model.r."""
    cfg = config.load(None, [], {"name": folder.name, "model.r": r, "model.targets": ["query", "value"], **keys})
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(config.to_yaml(cfg))
    info = {"format": 1, "name": folder.name, "status": status, "params": {"trainable": 1000 * r, "total": 10**6}}
    if status == "done":
        info["summary"] = {"best_step": steps[-1], "steps": steps[-1], "train_time_s": 12.5, "samples_per_s": 300.0,
                           "trainable": 1000 * r, "total": 10**6, "validation_accuracy": val}
        ev = {"validation": {"accuracy": val}}
        if test is not None:
            ev["test"] = {"accuracy": test}
        (folder / "eval.json").write_text(json.dumps(ev))
    (folder / "run.json").write_text(json.dumps(info))
    recs = [{"step": s, "split": "train", "loss": 1.0 / s} for s in steps]
    recs += [{"step": s, "split": "validation", "loss": 1.0 / s, "accuracy": val * s / steps[-1]} for s in steps]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in recs))
    return folder


def test_report_runs_and_sweep(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    fake_run(sweep / "r=2", 2, 0.81)
    fake_run(sweep / "r=8", 8, 0.86, test=0.85)
    fake_run(sweep / "r=16", 16, 0.3, status="running")  # killed mid-run: metrics but no summary
    (sweep / "configs").mkdir()
    over_cfg = config.load(None, [], {"model.r": 64, "model.targets": ["query", "value"]})
    (sweep / "configs" / "r=64.yaml").write_text(config.to_yaml(over_cfg))
    (sweep / "sweep.json").write_text(json.dumps({"members": [
        {"name": "r=64", "config": "configs/r=64.yaml", "trainable": 64000, "status": "over budget"}]}))
    single = fake_run(tmp_path / "solo", 4, 0.83)

    out = tmp_path / "rep"
    res = report([sweep, single], out_dir=out)
    assert res["keys"] == ["model.r"]
    assert [r["name"] for r in res["rows"]] == ["r=8", "solo", "r=2", "r=16", "r=64"]  # by accuracy; others last
    for f in ["results.md", "results.csv", "report.html", "train_loss.png", "val_loss.png", "val_accuracy.png",
              "accuracy_vs_params.png"]:
        assert (out / f).stat().st_size > 0, f
    md = (out / "results.md").read_text()
    assert "model.r" in md and "test acc" in md and "0.8600" in md and "over budget" in md and "unfinished" in md
    assert md in capsys.readouterr().out
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert rows[0]["run"] == "r=8" and rows[0]["model.r"] == "8" and float(rows[0]["test_accuracy"]) == 0.85
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4
    assert "<script" not in page and "http" not in page  # readable offline: nothing fetched


def test_report_names_and_errors(tmp_path):
    a = fake_run(tmp_path / "a" / "run", 2, 0.5)
    b = fake_run(tmp_path / "b" / "run", 4, 0.6)
    rows = collect([a, b])
    assert sorted(r["name"] for r in rows) == ["a/run", "b/run"]  # same folder name: the parent tells them apart
    assert differing_keys(rows) == ["model.r"]
    with pytest.raises(UserError, match="no such run or sweep folder"):
        report([tmp_path / "missing"], out_dir=tmp_path / "rep")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a run folder"):
        report([tmp_path / "empty"], out_dir=tmp_path / "rep")
    (b / "eval.json").write_text("{broken")
    with pytest.raises(UserError, match="eval.json: not valid JSON"):
        collect([b])


def test_many_runs_name_only_the_pareto_front(tmp_path, monkeypatch):
    """Eleven runs are too many to name in one small plot: the front is named (in the legend), the table names
    the rest; the same folder given twice (or as ./x and x) is one row."""
    from matplotlib.axes import Axes

    labels = []
    real = Axes.scatter
    monkeypatch.setattr(Axes, "scatter", lambda self, *a, **k: labels.append(k.get("label")) or real(self, *a, **k))
    runs = [fake_run(tmp_path / f"r{r}", r, val) for r, val in
            [(1, 0.70), (2, 0.80), (3, 0.75), (4, 0.85), (5, 0.82), (6, 0.84), (7, 0.83), (8, 0.86), (9, 0.81),
             (10, 0.79), (11, 0.78)]]
    res = report([*runs, runs[0], tmp_path / "." / "r1"], out_dir=tmp_path / "rep")
    assert len(res["rows"]) == 11
    named = [x for x in labels if x not in ("other runs", "Pareto front")]
    assert sorted(named) == ["r1", "r2", "r4", "r8"]  # each beats every cheaper run


def test_damaged_run_files_are_one_line_errors_naming_the_file(tmp_path):
    """Bytes that are not UTF-8, JSON of the wrong shape, a bad config value: each names its file."""
    cases = [("run.json", b'{"format": 1, "status": "done", "summary": "oops"}', "run.json: summary is not an object"),
             ("run.json", b'\xff\xfe{"format": 1}', "run.json: not valid JSON"),
             ("eval.json", b'{"validation": [1]}', "eval.json: split 'validation' has no numeric accuracy"),
             ("eval.json", b'{"validation": {"accuracy": "high"}}', "eval.json: split 'validation' has no numeric"),
             ("config.yaml", b"model:\n  r: abc\n", "config.yaml: config key model.r")]
    for i, (name, content, why) in enumerate(cases):
        run = fake_run(tmp_path / f"r{i}", 2, 0.5)
        (run / name).write_bytes(content)
        with pytest.raises(UserError, match=why):
            collect([run])


def test_metrics_lines_that_are_not_records_are_skipped(tmp_path):
    run = fake_run(tmp_path / "r", 2, 0.5)
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'[1, 2]\n{"split": "train", "loss": 1}\n\xff\xfe\n{"step": 30, "split": "train", "loss": 0.1}\n')
    from lorakd.runs import read_metrics

    recs = read_metrics(run)
    assert recs[-1] == {"step": 30, "split": "train", "loss": 0.1} and all(isinstance(r["step"], int) for r in recs)
    report([run], out_dir=tmp_path / "rep")  # the plots read them too


def test_failed_sweep_members_are_rows_and_a_run_named_twice_is_one(tmp_path):
    sweep_dir = tmp_path / "sweep"
    fake_run(sweep_dir / "r=2", 2, 0.81)
    fake_run(sweep_dir / "r=4", 4, 0.2, status="running")  # failed after its run folder was written
    (sweep_dir / "configs").mkdir()
    cfg = config.load(None, [], {"model.r": 8, "model.targets": ["query", "value"]})
    (sweep_dir / "configs" / "r=8.yaml").write_text(config.to_yaml(cfg))
    (sweep_dir / "sweep.json").write_text(json.dumps({"members": [
        {"name": "r=2", "folder": "r=2", "config": "configs/r=2.yaml", "status": "done"},
        {"name": "r=4", "folder": "r=4", "config": "configs/r=4.yaml", "status": "failed", "error": "diverged"},
        {"name": "r=8", "folder": "r=8", "config": "configs/r=8.yaml", "trainable": 8000, "status": "failed"}]}))
    rows = collect([sweep_dir, sweep_dir / "r=2"])
    assert [(r["name"], r["status"]) for r in rows] == [("r=2", "done"), ("r=4", "failed"), ("r=8", "failed")]


def mixed_report(tmp_path):
    """A sweep of two members, a pipeline (a full fine-tune teacher and its student) and a run of its own, with
    the long folder names and local paths that real ones have."""
    data = {"data.path": str(tmp_path / "shared" / "data" / "ag_news"), "model.backbone": str(tmp_path / "models" / "mini")}
    sweep = tmp_path / "sweep-minilm-ranks"
    fake_run(sweep / "r=2_targets=query+value", 2, 0.81, **data)
    fake_run(sweep / "r=8_targets=query+key+value+dense", 8, 0.84, test=0.83,
             **{**data, "model.targets": ["query", "key", "value", "dense"]})
    (sweep / "sweep.json").write_text(json.dumps({"members": []}))
    pipe = tmp_path / "pipeline-minilm-20261204-031500"
    fake_run(pipe / "teacher", 6, 0.88, **data, **{"role": "teacher", "model.full_finetune": True, "train.lr": 3e-5})
    fake_run(pipe / "student", 6, 0.86, **data, **{"distill.teachers": [str(pipe / "teacher")], "distill.alpha": 0.3})
    (pipe / "pipeline.json").write_text("{}")
    single = fake_run(tmp_path / "agnews-minilm-20261204-032233", 4, 0.85, **data, **{"train.lr": 1e-3})
    return [sweep, pipe, single]


def test_mixed_report_labels_are_short_unique_and_say_what_ran(tmp_path):
    res = report(mixed_report(tmp_path), out_dir=tmp_path / "rep")
    labels = {r["name"]: r["label"] for r in res["rows"]}
    assert labels["teacher"] == "pipeline-m…61204-031500: teacher" and labels["student"].endswith("031500: student")
    assert labels["r=2_targets=query+value"] == "r2 qv" and labels["r=8_targets=query+key+value+dense"] == "r8 qkvd"
    assert labels["agnews-minilm-20261204-032233"] == "agnews-minilm-20261204-032233"
    assert len(set(labels.values())) == 5 and all(len(x) <= 32 for x in labels.values())
    header, *rows = [line.split(" | ") for line in res["markdown"].splitlines() if not line.startswith("|-")]
    teacher = next(r for r in rows if r[0].endswith("teacher"))
    assert teacher[header.index("model.r")] == "full" and teacher[header.index("model.targets")] == "-"
    assert str(tmp_path) not in res["markdown"]  # local paths as their last part


def chromium():
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.skipif(chromium() is None, reason="no headless Chromium here (chromium, chromium-browser, google-chrome)")
def test_mixed_report_table_fits_a_1400_px_window_in_chromium(tmp_path):
    """The page, rendered by a real browser in a 1,400-px window: no horizontal scroll, every column inside."""
    report(mixed_report(tmp_path), out_dir=tmp_path / "rep")
    page = (tmp_path / "rep" / "report.html").read_text()
    probe = ("<script>const r = [...document.querySelectorAll('th')].map(c => c.getBoundingClientRect().right);"
             "document.body.setAttribute('data-measure', JSON.stringify({scroll: document.documentElement.scrollWidth,"
             " right: Math.max(...r), columns: r.length}));</script>")
    (tmp_path / "probe.html").write_text(page.replace("</body>", probe + "</body>"))
    dom = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,900",
                          "--dump-dom", (tmp_path / "probe.html").as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'data-measure="([^"]*)"', dom)
    assert found, dom[-500:]
    measure = json.loads(html.unescape(found.group(1)))
    assert measure["columns"] >= 10  # the mixed runs differ in many keys: a wide table
    assert measure["scroll"] <= 1400 and measure["right"] <= 1400, measure
