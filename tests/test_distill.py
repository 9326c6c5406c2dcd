"""Distillation: the loss against a hand computation, multi-teacher averaging, the logit cache."""
import math

import pytest
import torch
import torch.nn.functional as F

from lorakd.distill import cached_teacher_logits, soften, student_loss


def test_student_loss_by_hand():
    s = torch.tensor([[2.0, 0.0, -1.0]])
    t = torch.tensor([[1.0, 1.5, -0.5]])
    y = torch.tensor([1])
    alpha, T = 0.5, 2.0
    # by hand: softmaxes written out with math.exp
    def softmax(v):
        e = [math.exp(x) for x in v]
        return [x / sum(e) for x in e]
    ce = -math.log(softmax([2.0, 0.0, -1.0])[1])
    pt, ps = softmax([0.5, 0.75, -0.25]), softmax([1.0, 0.0, -0.5])
    kl = sum(p * (math.log(p) - math.log(q)) for p, q in zip(pt, ps))
    want = alpha * ce + (1 - alpha) * T * T * kl
    loss, ce_part, kd_part = student_loss(s, y, soften([t], [], T), alpha, T)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert ce_part.item() == pytest.approx(ce, rel=1e-6)
    assert kd_part.item() == pytest.approx(T * T * kl, rel=1e-5)


def test_alpha_one_is_plain_cross_entropy():
    s, t, y = torch.randn(5, 4), torch.randn(5, 4), torch.randint(0, 4, (5,))
    loss, _, _ = student_loss(s, y, soften([t], [], 2.0), 1.0, 2.0)
    assert loss.item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)
    plain, _, kd = student_loss(s, y, None, 0.5, 2.0)
    assert plain.item() == pytest.approx(F.cross_entropy(s, y).item()) and kd.item() == 0


def test_kd_matches_torch_kl_div():
    s, t, y, T = torch.randn(6, 4), torch.randn(6, 4), torch.randint(0, 4, (6,)), 3.0
    _, _, kd = student_loss(s, y, soften([t], [], T), 0.0, T)
    ref = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="batchmean")
    assert kd.item() == pytest.approx(T * T * ref.item(), rel=1e-5)


def test_soften_averages_weighted_teachers():
    a, b, T = torch.randn(3, 4), torch.randn(3, 4), 2.0
    got = soften([a, b], [3.0, 1.0], T)
    want = 0.75 * F.softmax(a / T, -1) + 0.25 * F.softmax(b / T, -1)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(got.sum(-1), torch.ones(3))


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
