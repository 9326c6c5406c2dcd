"""The command line itself: where key=value overrides may go, and what stays an error."""
import pytest

from lorakd.cli import main


def test_overrides_may_come_before_and_after_options(capsys):
    """argparse alone takes only the first run of key=value words; a later run follows it, in order."""
    main(["params", "model.backbone=roberta-base", "model.r=2", "--labels", "4", "model.r=6", "model.alpha=16",
          "model.targets=[query,key,value]"])
    assert "trainable 925,444 of 125,574,152" in capsys.readouterr().out


def test_unknown_words_and_options_are_still_refused(capsys):
    for argv, said in ((["params", "--labels", "4", "--bogus"], "unrecognized arguments: --bogus"),
                       (["params", "model.r=6", "--labels", "4", "stray"], "unrecognized arguments: stray"),
                       (["params", "--labels", "4", "stray"], "override 'stray': expected key=value"),
                       (["report", "runs/x", "--out", "r", "model.r=6"], "unrecognized arguments: model.r=6")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and said in capsys.readouterr().err


def test_double_dash_only_separates(capsys):
    main(["params", "model.backbone=roberta-base", "--labels", "4", "--", "model.r=6", "model.alpha=16",
          "model.targets=[query,key,value]"])
    assert "trainable 925,444 of 125,574,152" in capsys.readouterr().out


@pytest.mark.parametrize("argv,key", [
    (["params", "--model", "roberta-base", "model.backbone=embedded:minilm"], "model.backbone"),
    (["params", "--labels", "3", "data.label_names=[a,b]"], "data.label_names"),
    (["params", "--full-finetune", "model.full_finetune=false"], "model.full_finetune"),
    (["params", "--r", "4", "model.r=8"], "model.r"),
    (["train", "--data", "d", "model.budget=0", "--budget", "50000"], "model.budget"),
    (["train", "data.path=x", "--data", "d"], "data.path"),
    (["sweep", "sweeps/minilm-ranks.yaml", "--data", "d", "--set", "data.path=x"], "data.path"),
])
def test_an_option_and_a_key_for_the_same_setting_are_refused(capsys, argv, key):
    """Neither silently wins: `--budget 50000 model.budget=0` trained over the budget the user set."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and f"{key} given twice" in capsys.readouterr().err


def test_a_sweep_says_where_its_overrides_go(capsys):
    with pytest.raises(SystemExit) as e:
        main(["sweep", "sweeps/minilm-ranks.yaml", "--dry-run", "train.lr=1e-3"])
    assert e.value.code == 2 and "a sweep takes overrides as --set key=value" in capsys.readouterr().err


def test_a_predict_input_with_a_column_named_twice_is_refused(tmp_path):
    from lorakd import predict
    from lorakd.errors import UserError

    path = tmp_path / "in.csv"
    path.write_text("id,text,text\n1,a,b\n2,c,d\n")
    with pytest.raises(UserError, match="column 'text' is named twice"):
        predict.read_input(path)


def test_bare_lorakd_prints_help_and_version_prints_the_version(capsys):
    from lorakd import __version__

    main([])
    assert "usage: lorakd" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"lorakd {__version__}"
    with pytest.raises(SystemExit) as exc:
        main(["--bogus"])
    assert exc.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
