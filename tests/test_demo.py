"""`lorakd demo` without --data: AG News from the hub, or one line saying what to install or pass."""
import importlib.util

import pytest

from lorakd.cli import main


def demo_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--out", "unused"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    return err


def test_demo_offline_says_to_pass_data(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the test never reaches for the network
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    err = demo_error(capsys)
    assert "HF_HUB_OFFLINE is set" in err and "--data DIR" in err


def test_demo_without_datasets_says_what_to_install(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real(name, *a))
    err = demo_error(capsys)
    assert 'pip install "lorakd[hub]"' in err and "--data DIR" in err


def test_demo_unreachable_hub_says_to_pass_data(capsys, monkeypatch):
    """The 2-second connection check finds no hub: one line at once, datasets never asked."""
    import datasets

    from lorakd import backbones

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(backbones, "_HUB_OUT_OF_REACH", True)
    monkeypatch.setattr(datasets, "load_dataset_builder", lambda *a, **k: pytest.fail("datasets was asked"))
    err = demo_error(capsys)
    assert "from the hub, which is out of reach" in err and "--data DIR" in err


def test_demo_hub_that_fails_later_says_to_pass_data(capsys, monkeypatch):
    """The host answers but datasets cannot get AG News (a firewall, an outage): one line too."""
    import datasets

    from lorakd import backbones

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(backbones, "_HUB_OUT_OF_REACH", False)

    def no_network(*a, **k):
        raise ConnectionError("no route to host")
    monkeypatch.setattr(datasets, "load_dataset_builder", no_network)
    err = demo_error(capsys)
    assert "cannot reach AG News on the hub (ConnectionError)" in err and "--data DIR" in err
