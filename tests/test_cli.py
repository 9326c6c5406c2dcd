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
