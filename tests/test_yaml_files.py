"""YAML files: only true/false are booleans, and the shipped presets and sweeps are found by name."""
from pathlib import Path

import pytest

from lorakd import config, yaml_files
from lorakd.errors import UserError
from lorakd.yaml_files import PRESETS, preset_path


def test_yaml_on_and_off_are_text_where_text_is_expected(tmp_path):
    """Only true/false are YAML booleans here: `cuda_graphs: off` is the choice "off", not False."""
    path = tmp_path / "c.yaml"
    path.write_text("name: yes\ntrain:\n  cuda_graphs: off\n  tensorboard: on\n")
    cfg = config.load(path)
    assert (cfg.name, cfg.train.cuda_graphs, cfg.train.tensorboard) == ("yes", "off", True)
    path.write_text(config.to_yaml(cfg))
    assert config.load(path) == cfg


def test_shipped_presets_and_sweeps_are_found_by_name_from_any_folder(tmp_path, monkeypatch):
    """presets and sweeps ship inside the package: found by name, with .yaml, or as the old checkout path
    presets/NAME.yaml, from a folder without them; a user's own file path still wins."""
    from lorakd import sweep

    monkeypatch.chdir(tmp_path)
    assert PRESETS.parent == sweep.SWEEPS.parent == Path(yaml_files.__file__).parent
    for preset in sorted(PRESETS.glob("*.yaml")):
        for form in (preset.stem, preset.name, f"presets/{preset.name}"):
            assert preset_path(form) == preset, form
    for s in sorted(sweep.SWEEPS.glob("*.yaml")):
        for form in (s.stem, s.name, f"sweeps/{s.name}"):
            assert sweep.find_sweep(form) == s, form
            assert sweep.plan(form)[2]  # its members build, from the preset it names as base
    mine = tmp_path / "presets" / "agnews-minilm.yaml"
    mine.parent.mkdir()
    mine.write_text("name: mine\n")
    assert preset_path("presets/agnews-minilm.yaml") == Path("presets/agnews-minilm.yaml")
    assert config.load(preset_path("presets/agnews-minilm.yaml")).name == "mine"
    with pytest.raises(UserError, match="no such sweep file"):
        sweep.find_sweep("elsewhere/minilm-ranks.yaml")


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(UserError, match="no such config file or preset .*agnews-minilm"):
        preset_path("no-such-preset")
