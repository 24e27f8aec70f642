"""Each distillation loss against values computed by hand on 2-class and 3-class rows."""
from __future__ import annotations

import math

import pytest
import torch

from trainer.losses import acceptance, forward_kl, jsd, loss_fn, osd_jsd, reverse_kl, tvd, weighted_mean

P = torch.tensor([[0.75, 0.25]])  # teacher
Q = torch.tensor([[0.5, 0.5]])    # student
LP, LQ = P.log(), Q.log()
ONE = torch.ones(1)


def test_two_class_closed_forms() -> None:
    fkl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    rkl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert forward_kl(LQ, LP, ONE).item() == pytest.approx(fkl, abs=1e-6)   # 0.130812
    assert reverse_kl(LQ, LP, ONE).item() == pytest.approx(rkl, abs=1e-6)   # 0.143841
    assert tvd(LQ, LP, ONE).item() == pytest.approx(0.25, abs=1e-6)
    assert osd_jsd(LQ, LP, ONE).item() == pytest.approx(0.9 * fkl + 0.1 * rkl, abs=1e-6)
    # JSD(0.5) with m = (0.625, 0.375)
    m = (0.625, 0.375)
    by_hand = 0.5 * (0.75 * math.log(0.75 / m[0]) + 0.25 * math.log(0.25 / m[1])) + \
        0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1]))
    assert jsd(LQ, LP, ONE, 0.5).item() == pytest.approx(by_hand, abs=1e-6)
    # beta = 0.9: m = 0.9 p + 0.1 q = (0.725, 0.275)
    m = (0.725, 0.275)
    by_hand = 0.9 * (0.75 * math.log(0.75 / m[0]) + 0.25 * math.log(0.25 / m[1])) + \
        0.1 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1]))
    assert jsd(LQ, LP, ONE, 0.9).item() == pytest.approx(by_hand, abs=1e-6)


def test_zero_when_equal_and_jsd_symmetric_and_tvd_is_one_minus_acceptance() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 7, generator=g).log_softmax(-1)
    b = torch.randn(5, 7, generator=g).log_softmax(-1)
    w = torch.ones(5)
    for name in ("fkl", "rkl", "jsd", "tvd", "osd_jsd"):
        assert loss_fn(name)(a, a, w).item() == pytest.approx(0.0, abs=1e-6)
    assert jsd(a, b, w, 0.5).item() == pytest.approx(jsd(b, a, w, 0.5).item(), abs=1e-6)
    assert tvd(a, b, w).item() == pytest.approx(1 - acceptance(a, b).mean().item(), abs=1e-6)


def test_weights_mask_positions_and_all_masked_is_zero_with_a_graph() -> None:
    student = torch.cat([LQ, LP]).clone().requires_grad_(True)  # row 1 equals the teacher
    teacher = torch.cat([LP, LP])
    only_second = forward_kl(student, teacher, torch.tensor([0.0, 1.0]))
    assert only_second.item() == pytest.approx(0.0, abs=1e-7)
    weighted = forward_kl(student, teacher, torch.tensor([3.0, 1.0]))
    assert weighted.item() == pytest.approx(0.75 * forward_kl(LQ, LP, ONE).item(), abs=1e-6)
    for name in ("fkl", "rkl", "jsd", "tvd", "osd_jsd"):
        out = loss_fn(name)(student, teacher, torch.zeros(2))
        assert out.item() == 0.0
        out.backward()  # an empty batch is a no-op step, not a crash
        assert student.grad is not None and torch.all(student.grad == 0)
        student.grad = None
    assert weighted_mean(torch.zeros(0), torch.zeros(0)).item() == 0.0


def test_no_gradient_reaches_the_teacher() -> None:
    teacher = LP.clone().requires_grad_(True)
    student = LQ.clone().requires_grad_(True)
    for name in ("fkl", "rkl", "jsd", "tvd", "osd_jsd"):
        loss_fn(name)(student, teacher, ONE).backward()
    assert teacher.grad is None and student.grad is not None


def test_bad_names_are_named() -> None:
    with pytest.raises(ValueError, match="loss='kl2'"):
        loss_fn("kl2")
    with pytest.raises(ValueError, match="beta=1.0"):
        jsd(LQ, LP, ONE, 1.0)
