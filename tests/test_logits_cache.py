"""The teacher-logit cache: a hit, a stale key (other weights, other rows) and a torn file."""
import torch

from lorakd.logits_cache import cached_teacher_logits


def test_logit_cache_hit_stale_and_corrupt(tmp_path):
    (tmp_path / "adapter").mkdir()
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(b"weights-v1")
    calls = []

    def compute():
        calls.append(1)
        return torch.full((4, 2), float(len(calls)))

    first, hit = cached_teacher_logits(tmp_path, "data1", compute)
    assert not hit and len(calls) == 1
    again, hit = cached_teacher_logits(tmp_path, "data1", compute)
    assert hit and len(calls) == 1 and torch.equal(first, again)
    cached_teacher_logits(tmp_path, "data2", compute)  # other data: its own cache
    assert len(calls) == 2
    weights.write_bytes(b"weights-v2")  # teacher retrained: the cache is stale and rebuilt
    _, hit = cached_teacher_logits(tmp_path, "data1", compute)
    assert not hit and len(calls) == 3
    (tmp_path / "logits" / "data1.pt").write_bytes(b"torn")  # a broken file is rebuilt, not used
    _, hit = cached_teacher_logits(tmp_path, "data1", compute)
    assert not hit and len(calls) == 4
