"""Distillation: the loss against a hand computation, multi-teacher averaging, transfer rows, teachers."""
import math

import pytest
import torch
import torch.nn.functional as F

from lorakd.distill import soften, student_loss


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


def test_transfer_rows_learn_from_kd_alone():
    """A row with label -1 (a transfer row) contributes T^2 * KL only; labelled rows the mix."""
    s, t, T, alpha = torch.randn(4, 3), torch.randn(4, 3), 2.0, 0.3
    y = torch.tensor([2, -1, 0, -1])
    soft = soften([t], [], T)
    loss, ce, kd = student_loss(s, y, soft, alpha, T)
    kd_rows = T * T * F.kl_div(F.log_softmax(s / T, -1), soft, reduction="none").sum(-1)
    ce_rows = F.cross_entropy(s, y.clamp(min=0), reduction="none")
    want = torch.stack([alpha * ce_rows[0] + (1 - alpha) * kd_rows[0], kd_rows[1],
                        alpha * ce_rows[2] + (1 - alpha) * kd_rows[2], kd_rows[3]]).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert ce.item() == pytest.approx(ce_rows[[0, 2]].mean().item(), rel=1e-5)  # CE over labelled rows only
    assert kd.item() == pytest.approx(kd_rows.mean().item(), rel=1e-5)
    all_labelled, _, _ = student_loss(s, torch.tensor([2, 1, 0, 1]), soft, alpha, T)  # no -1: the plain mix
    mix = alpha * F.cross_entropy(s, torch.tensor([2, 1, 0, 1])) + (1 - alpha) * kd_rows.mean()
    assert all_labelled.item() == pytest.approx(mix.item(), rel=1e-5)


def test_transfer_rows_need_a_teacher(tiny_config):
    from lorakd import data
    from lorakd.distill import transfer_rows
    from lorakd.errors import UserError

    cfg = tiny_config(**{"distill.augment": 2})
    splits = data.load_splits(cfg.data, 0)
    with pytest.raises(UserError, match="need distill.teachers"):
        transfer_rows(cfg, splits)
    cfg = tiny_config(**{"data.labelled": 40})  # no teachers: the other rows are unused, and the log says so
    logs = []
    assert transfer_rows(cfg, data.load_splits(cfg.data, 0), log=logs.append) is None
    assert logs == ["data.labelled: the other 320 train rows are not used by this run (it has no distill.teachers "
                    "to label them)"]


def _teacher(tiny_config, tmp_path, **over):
    from lorakd.train import train

    cfg = tiny_config(**{"role": "teacher", "model.full_finetune": True, "train.lr": 3e-3, "train.epochs": 3, **over})
    train(cfg, tmp_path / "teacher", log=lambda *a: None)
    return tmp_path / "teacher"


def test_transfer_set_from_labelled_rest_unlabeled_file_and_augmentation(tiny_config, tmp_path):
    """Rows: N labelled + the rest + an unlabeled file + augmented copies; teacher logits cached per part."""
    from lorakd import data
    from lorakd.distill import student_rows

    teacher = _teacher(tiny_config, tmp_path, **{"data.labelled": 40})
    extra = tmp_path / "more.csv"
    extra.write_text("text\nnasa linux chip software\nelection treaty minister\n")
    cfg = tiny_config(**{"data.labelled": 40, "distill.teachers": [str(teacher)], "distill.unlabeled": str(extra),
                         "distill.augment": 2})
    splits = data.load_splits(cfg.data, cfg.train.seed)
    assert len(splits["train"]) == 40 and len(splits["unlabelled"]) == 360 - 40
    logs = []
    rows, probs = student_rows(cfg, splits, torch.device("cpu"), logs.append)
    assert len(rows) == 40 + 320 + 2 + 80 == probs.shape[0]
    assert (rows.labels[:40] >= 0).all() and (rows.labels[40:] == -1).all()
    assert torch.allclose(probs.sum(-1), torch.ones(len(rows)))
    assert len(list((teacher / "logits").glob("*.pt"))) == 2  # labelled part and transfer part
    logs.clear()
    student_rows(cfg, splits, torch.device("cpu"), logs.append)
    assert all("from cache" in line for line in logs if line.startswith("teacher"))
    hard = tiny_config(**{"data.labelled": 40, "distill.teachers": [str(teacher)], "distill.transfer_targets": "hard"})
    rows, probs = student_rows(hard, splits, torch.device("cpu"), lambda *a: None)
    assert torch.equal(torch.as_tensor(rows.labels[40:]), probs[40:].argmax(-1))  # self-training labels
    capped = tiny_config(**{"data.labelled": 40, "distill.teachers": [str(teacher)], "distill.max_transfer": 50})
    assert len(student_rows(capped, splits, torch.device("cpu"), lambda *a: None)[0]) == 90
    every = tiny_config(**{"data.labelled": 40, "distill.teachers": [str(teacher)], "distill.unlabeled": str(extra),
                           "distill.augment": 2, "distill.augment_scope": "all"})
    rows, _ = student_rows(every, splits, torch.device("cpu"), lambda *a: None)
    assert len(rows) == 40 + 320 + 2 + 2 * (40 + 320 + 2)  # copies of the unlabelled texts too
    assert rows.texts[362:] == data.augment(rows.texts[:362], 2, ("delete", "swap"), every.train.seed, "[MASK]")


def test_student_trains_on_transfer_rows(tiny_config, tmp_path):
    """End to end on the tiny backbone: a distilled student with transfer rows trains on every row and logs CE
    and KD. (Whether it learns is the next test's: on this randomly initialised backbone training is bimodal,
    0.5 or 1.0 by seed, so an accuracy here would test the seed, not distillation.)"""
    from lorakd.runs import read_metrics
    from lorakd.train import train

    teacher = _teacher(tiny_config, tmp_path, **{"model.full_finetune": False, "train.lr": 2e-2, "train.epochs": 2})
    cfg = tiny_config(**{"data.labelled": 60, "distill.teachers": [str(teacher)], "distill.augment": 1,
                         "train.epochs": 3})
    s = train(cfg, tmp_path / "student", log=lambda *a: None)
    assert s["steps"] == 3 * -(-(60 + 300 + 60) // 8)
    records = [r for r in read_metrics(tmp_path / "student") if r["split"] == "train"]
    assert records and all(r["kd"] > 0 and math.isfinite(r["ce"]) for r in records)


@pytest.mark.slow
def test_distilled_student_beats_its_teacher_on_transfer_rows(tiny_config, tmp_path):
    """Few labels, many texts, a pretrained backbone (the embedded MiniLM): the teacher learns from 40 labels;
    the same student config distilled over the other 320 rows' teacher labels beats it by far. Margins are wide
    on 100 validation rows (3 seeds measured: teacher 0.51-0.73, student 0.89-0.96), so no row decides it."""
    import json

    from lorakd.train import train

    common = {"model.backbone": "embedded:minilm", "data.val_fraction": 0.25, "data.labelled": 40,
              "train.batch_size": 16, "train.lr": 1e-3, "train.epochs": 2}
    teacher = _teacher(tiny_config, tmp_path, **{"model.full_finetune": False, **common})
    train(tiny_config(**common, **{"distill.teachers": [str(teacher)]}), tmp_path / "student", log=lambda *a: None)
    teacher_acc, student_acc = (json.loads((p / "eval.json").read_text())["validation"]["accuracy"]
                                for p in (teacher, tmp_path / "student"))
    assert student_acc >= 0.8 and student_acc >= teacher_acc + 0.15, (teacher_acc, student_acc)


def test_a_teacher_must_be_finished_and_have_the_students_classes(tiny_config, tmp_path):
    """Refused before any logits are computed: a killed teacher's half-trained weights, and a teacher whose
    logit i means another class than the student's."""
    import json

    from lorakd import config, data
    from lorakd.distill import teacher_logits
    from lorakd.errors import UserError

    student = tiny_config()
    parts = [data.load_splits(student.data, 0)["train"]]
    cases = [("running", student.data.label_names, "has not finished training .status running."),
             ("done", ["Sci/Tech", "Business", "Sports", "World"], "the teacher's classes .* are not the student's")]
    for i, (status, names, why) in enumerate(cases):
        run = tmp_path / f"t{i}"
        run.mkdir()
        t_cfg = tiny_config(**{"role": "teacher", "model.full_finetune": True, "data.label_names": list(names)})
        (run / "config.yaml").write_text(config.to_yaml(t_cfg))
        (run / "run.json").write_text(json.dumps({"format": 1, "status": status}))
        with pytest.raises(UserError, match=why):
            teacher_logits(run, student, parts, "cpu", lambda *a: None)
        assert not (run / "logits").exists()


def test_unlabeled_texts_that_are_held_out_texts_are_left_out(tiny_config, tmp_path):
    """A validation text in the distill.unlabeled file would be trained on with the teacher's label."""
    from lorakd import data
    from lorakd.distill import transfer_rows

    cfg = tiny_config()
    splits = data.load_splits(cfg.data, 0)
    val, test = splits["validation"].texts[:3], splits["test"].texts[:2]
    unl = tmp_path / "unl.jsonl"
    unl.write_text("".join(f'{{"text": "{t}"}}\n' for t in ["a fresh text", *val, *test, "another one"]))
    logs = []
    cfg = tiny_config(**{"distill.unlabeled": str(unl), "distill.teachers": [str(tmp_path / "t")]})
    rows = transfer_rows(cfg, splits, log=logs.append)
    assert rows.texts == ["a fresh text", "another one"]
    assert logs == ["distill.unlabeled: 5 texts that are also validation or test texts left out"]
