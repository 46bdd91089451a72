import math

import numpy as np
import pytest
import torch

from loss import DeSDLoss


def reference_dino_term(
    student: np.ndarray, teacher: np.ndarray, center: np.ndarray, ncrops: int, t_temp: float, s_temp: float = 0.1
) -> float:
    """Independent float64 computation: mean over (teacher view i, student view v != i) of the
    batch mean of sum(-p_t * log_softmax(s / s_temp))."""

    def softmax(z):
        z = z - z.max(-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(-1, keepdims=True)

    b = student.shape[0] // ncrops
    p_t = softmax((teacher - center) / t_temp)
    log_s = np.log(softmax(student / s_temp))
    terms = []
    for i in range(2):
        for v in range(ncrops):
            if v != i:
                terms.append(np.mean(np.sum(-p_t[i * b : (i + 1) * b] * log_s[v * b : (v + 1) * b], axis=-1)))
    return float(np.mean(terms))


def make_loss(**kw):
    args = dict(out_dim=10, ncrops=4, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=20, nepochs=100)
    args.update(kw)
    return DeSDLoss(**args)


def test_each_stage_term_matches_an_independent_computation():
    rng = np.random.default_rng(0)
    loss = make_loss()
    loss.center.copy_(torch.from_numpy(rng.normal(size=(1, 10))))
    students = [rng.normal(size=(12, 10)) for _ in range(4)]
    teacher = rng.normal(size=(6, 10))
    out = loss([torch.tensor(s, dtype=torch.float32) for s in students], torch.tensor(teacher, dtype=torch.float32), epoch=5)
    t_temp = np.linspace(0.04, 0.07, 20)[5]
    center = loss.center.numpy().astype(np.float64)
    expected = [reference_dino_term(s, teacher, center, 4, t_temp) for s in students]
    for k, e in enumerate(expected, 1):
        assert out[f"stage{k}"].item() == pytest.approx(e, rel=1e-5)
    assert out["loss"].item() == pytest.approx(0.25 * sum(expected), rel=1e-5)


def test_uniform_student_output_gives_ln_out_dim():
    loss = make_loss(out_dim=60000, ncrops=2)
    teacher = torch.randn(4, 60000)
    out = loss([torch.zeros(4, 60000)] * 4, teacher, epoch=0)
    assert out["loss"].item() == pytest.approx(math.log(60000), rel=1e-5)
    assert math.log(60000) == pytest.approx(11.0, abs=0.01)


def test_deep_weights_zero_is_exactly_dino():
    torch.manual_seed(0)
    students = [torch.randn(8, 10) for _ in range(4)]
    teacher = torch.randn(4, 10)
    desd = make_loss(stage_weights=(0, 0, 0, 1))(students, teacher, epoch=30)
    reference = reference_dino_term(students[3].double().numpy(), teacher.double().numpy(), np.zeros((1, 10)), 4, 0.07)
    assert desd["loss"].item() == pytest.approx(reference, rel=1e-5)
    other = make_loss(stage_weights=(0, 0, 0, 1))([torch.randn(8, 10)] * 3 + [students[3]], teacher, epoch=30)
    assert other["loss"].item() == pytest.approx(desd["loss"].item(), rel=1e-6)


def test_forward_leaves_center_and_update_center_is_an_ema_of_the_batch_mean():
    loss = make_loss()
    teacher = torch.randn(6, 10)
    loss([torch.randn(12, 10)] * 4, teacher, epoch=0)
    assert torch.count_nonzero(loss.center) == 0
    loss.update_center(teacher)
    assert torch.allclose(loss.center, 0.1 * teacher.mean(0, keepdim=True))
    loss.update_center(teacher)
    assert torch.allclose(loss.center, (0.9 * 0.1 + 0.1) * teacher.mean(0, keepdim=True))


def test_teacher_temperature_warms_linearly_then_stays():
    loss = make_loss()
    assert loss.teacher_temp(0) == pytest.approx(0.04)
    assert loss.teacher_temp(19) == pytest.approx(0.07)
    assert loss.teacher_temp(10) == pytest.approx(0.04 + 0.03 * 10 / 19)
    assert loss.teacher_temp(99) == pytest.approx(0.07)


def test_view_retrieval_is_1_on_identical_views_and_about_chance_on_random_ones():
    from loss import view_retrieval

    torch.manual_seed(0)
    views = torch.randn(64, 32)
    assert view_retrieval(torch.cat([views, views])).item() == 1.0
    scores = [view_retrieval(torch.randn(128, 32)).item() for _ in range(200)]  # batch 64: chance 1/64
    assert abs(sum(scores) / len(scores) - 1 / 64) < 0.006
    noisy = torch.cat([views, views + 1.5 * torch.randn_like(views)])
    assert 0.5 < view_retrieval(noisy).item() < 1.0
