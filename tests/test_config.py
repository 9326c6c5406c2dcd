"""Config: YAML round trip, key=value overrides, frozen values, clear errors, every preset loads."""
import dataclasses

import pytest

from lorakd import config
from lorakd.errors import UserError
from lorakd.yaml_files import PRESETS, preset_path, read_yaml


def test_yaml_round_trip(tmp_path):
    cfg = config.load(None, ["name=rt", "role=teacher", "model.r=8", "model.layers=[0,3]", "train.lr=3e-5",
                             "data.label_names=[neg,pos]", "distill.teachers=[a,b]", "distill.weights=[1,3]"])
    path = tmp_path / "c.yaml"
    path.write_text(config.to_yaml(cfg))
    assert config.load(path) == cfg
    assert config.from_dict(config.to_dict(cfg)) == cfg


def test_defaults_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(config.to_yaml(config.Config()))
    assert config.load(path) == config.Config() == config.load()


@pytest.mark.parametrize("override,key,value", [
    ("model.r=8", "model.r", 8),
    ("model.targets=query,value", "model.targets", ("query", "value")),
    ("model.targets=[query, value]", "model.targets", ("query", "value")),
    ("model.layers=[0,1]", "model.layers", (0, 1)),
    ("model.layers=", "model.layers", ()),
    ("train.lr=1e-3", "train.lr", 1e-3),
    ("train.epochs=2", "train.epochs", 2.0),
    ("model.r=6.0", "model.r", 6),
    ("model.full_finetune=yes", "model.full_finetune", True),
    ("data.path=hub:ag_news", "data.path", "hub:ag_news"),
    ("name=a=b", "name", "a=b"),
    ("train.cuda_graphs=on", "train.cuda_graphs", "on"),
    ("name=no", "name", "no"),
    ("model.full_finetune=on", "model.full_finetune", True),
])
def test_override(override, key, value):
    got = config.flatten(config.load(None, [override]))[key]
    assert got == value and type(got) is type(value)


def test_precedence_file_then_extra_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: file\nmodel:\n  r: 2\n  alpha: 4\ndata:\n  path: from-file\n")
    cfg = config.load(path, ["model.r=8"], {"model.r": 5, "data.path": "from-extra"})
    assert (cfg.name, cfg.model.r, cfg.model.alpha, cfg.data.path) == ("file", 8, 4.0, "from-extra")


def test_large_integers_stay_exact():
    assert config.load(None, ["model.budget=12345678901234567"]).model.budget == 12345678901234567


def test_config_is_frozen():
    cfg = config.Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.r = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.name = "other"
    changed = config.override(cfg, **{"model.r": 3})
    assert changed.model.r == 3 and cfg.model.r == 6


@pytest.mark.parametrize("override,key", [
    ("model.rank=4", "model.rank"),
    ("trian.lr=1", "trian"),
    ("bogus=1", "bogus"),
])
def test_unknown_key_names_the_dotted_key(override, key):
    with pytest.raises(UserError, match=rf"^unknown config key {key} \((did you mean \S+\? )?known: "):
        config.load(None, [override])


@pytest.mark.parametrize("override,suggested", [
    ("trian.lr=1", "train"), ("train.lrr=1", "train.lr"), ("model.taregts=[query]", "model.targets"),
    ("data.label_name=[a,b]", "data.label_names"),
])
def test_unknown_key_suggests_the_closest(override, suggested):
    with pytest.raises(UserError, match=rf"did you mean {suggested}\? known: "):
        config.load(None, [override])


@pytest.mark.parametrize("key", sorted(config.CHOICES))
def test_choices_are_checked(key):
    with pytest.raises(UserError) as exc:
        config.load(None, [f"{key}=bogus"])
    assert str(exc.value) == f"config key {key}: 'bogus' is not one of {', '.join(config.CHOICES[key])}"


def test_choices_accept_their_values():
    for key, allowed in config.CHOICES.items():
        for value in allowed:
            assert config.flatten(config.load(None, [f"{key}={value}"]))[key] == value


def test_flatten_lists_every_key_once():
    flat = config.flatten(config.Config())
    assert flat["model.r"] == 6 and flat["role"] == "student" and flat["model.targets"] == ("query", "key", "value")
    assert config.from_dict(config.merge({}, flat)) == config.Config()


@pytest.mark.parametrize("preset", sorted(PRESETS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_preset_loads(tmp_path, preset):
    """A pipeline preset (with a `teacher:` section) loads as `lorakd pipeline` splits it."""
    raw = read_yaml(preset_path(preset.stem))  # by name, as `--config NAME` finds it
    if "teacher" in raw:
        from lorakd.pipeline import split_configs

        teacher, cfg = split_configs(raw)
        assert teacher.role == "teacher"
    else:
        cfg = config.from_dict(raw)
    (tmp_path / "again.yaml").write_text(config.to_yaml(cfg))
    assert config.load(tmp_path / "again.yaml") == cfg


def _leaves(raw: dict, prefix="") -> dict:
    """{'model.r': 9, ...}: a YAML mapping's keys as dotted paths."""
    out = {}
    for k, v in raw.items():
        out.update(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@pytest.mark.parametrize("preset", sorted(PRESETS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_preset_key_differs_from_the_default(preset):
    """A preset says only how it differs: each key from the defaults, a pipeline's teacher keys from the
    teacher the pipeline makes of the student (role teacher, full fine-tune)."""
    from lorakd.pipeline import split_configs

    raw = read_yaml(preset_path(preset.stem))
    teacher_raw = raw.pop("teacher", None)
    default = config.flatten(config.Config())
    student = config.flatten(config.from_dict(raw))
    same = [k for k in _leaves(raw) if student[k] == default[k]]
    if teacher_raw is not None:
        teacher_default = config.flatten(split_configs(raw)[0])
        teacher = config.flatten(split_configs({**raw, "teacher": teacher_raw})[0])
        same += [f"teacher.{k}" for k in _leaves(teacher_raw) if teacher[k] == teacher_default[k]]
    assert same == [], f"{preset.name} restates the defaults of {same}"


def test_local_paths_are_stored_absolute(tmp_path, monkeypatch):
    """A run's config.yaml must work from any folder: local paths become absolute, names stay as typed."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "teacher").mkdir()
    cfg = config.load(None, ["data.path=data", "distill.teachers=[teacher,no-such-run]", "distill.unlabeled=x.csv"])
    assert cfg.data.path == str(tmp_path / "data")
    assert cfg.distill.teachers == (str(tmp_path / "teacher"), "no-such-run")  # its error names it as typed
    assert cfg.distill.unlabeled == "x.csv" and cfg.model.backbone == "embedded:minilm"
    assert config.load(None, ["data.path=hub:ag_news"]).data.path == "hub:ag_news"
    (tmp_path / "run.yaml").write_text(config.to_yaml(cfg))
    monkeypatch.chdir(tmp_path / "data")
    assert config.load(tmp_path / "run.yaml") == cfg


def test_fmt_value():
    assert config.fmt_value("model.targets", ("query", "value")) == "query+value"
    assert config.fmt_value("model.layers", ()) == "all"
    assert config.fmt_value("train.lr", 2e-4) == "0.0002"
