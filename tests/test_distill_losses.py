"""Distillation losses against their definitions: T^2 scaling of the soft term, alpha mixing, masks."""

import math

import pytest
import torch
import torch.nn.functional as F

from compress.distill import losses


def _kl_by_hand(s, t, T):
    p_t = torch.softmax(t / T, -1)
    return (p_t * (torch.log(p_t) - torch.log_softmax(s / T, -1))).sum(-1).mean() * T**2


def test_soft_target_loss_is_t_squared_kl_batchmean():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    for T in (0.5, 1.0, 2.0, 4.0):
        assert torch.allclose(losses.soft_target_loss(s, t, T), _kl_by_hand(s, t, T), atol=1e-6)
    assert float(losses.soft_target_loss(s, s, 3.0)) == pytest.approx(0.0, abs=1e-6)


def test_t_squared_factor_keeps_the_gradient_scale():
    # d/ds [T^2 KL(softmax(t/T) || softmax(s/T))] = T (softmax(s/T) - softmax(t/T)) / N: exactly, for every T
    g = torch.Generator().manual_seed(1)
    t = torch.randn(8, 10, generator=g)
    base = torch.randn(8, 10, generator=g) * 0.5
    norms = {}
    for T in (1.0, 4.0, 16.0):
        s = base.clone().requires_grad_(True)
        losses.soft_target_loss(s, t, T).backward()
        expected = T * (torch.softmax(s.detach() / T, -1) - torch.softmax(t / T, -1)) / s.shape[0]
        assert torch.allclose(s.grad, expected, atol=1e-6)
        norms[T] = float(s.grad.norm())
        # without the T^2 factor the gradient would be T^2 times smaller
        s2 = base.clone().requires_grad_(True)
        (losses.soft_target_loss(s2, t, T) / T**2).backward()
        assert float(s2.grad.norm()) == pytest.approx(norms[T] / T**2, rel=1e-5)
    # for high temperatures the scaled gradient tends to (s - t) / (C N), whatever T: it does not vanish
    assert 0.5 < norms[16.0] / norms[4.0] < 2.0
    limit = ((base - base.mean(-1, keepdim=True)) - (t - t.mean(-1, keepdim=True))) / (10 * 8)
    assert norms[16.0] == pytest.approx(float(limit.norm()), rel=0.1)


def test_masked_positions_do_not_count():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 5, 7, generator=g, requires_grad=True)
    t = torch.randn(2, 5, 7, generator=g)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 0, 0]])
    loss = losses.soft_target_loss(s, t, 2.0, mask)
    kept = mask.bool()
    assert torch.allclose(loss, losses.soft_target_loss(s[kept], t[kept], 2.0), atol=1e-6)  # mean over the 5 kept rows
    loss.backward()
    assert torch.all(s.grad[~kept] == 0) and torch.all(s.grad[kept].abs().sum(-1) > 0)
    # whatever the student says at masked positions, the loss is the same
    s_other = s.detach().clone()
    s_other[~kept] = 100.0
    assert torch.allclose(losses.soft_target_loss(s_other, t, 2.0, mask), loss.detach(), atol=1e-6)
    # nothing kept: zero, and still differentiable
    zero = losses.soft_target_loss(s, t, 2.0, torch.zeros_like(mask))
    assert float(zero.detach()) == 0.0 and zero.requires_grad


def test_kd_loss_mixes_soft_and_hard_by_alpha():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    y = torch.tensor([0, 2, 1, -100])
    ce = F.cross_entropy(s, y, ignore_index=-100)
    soft = _kl_by_hand(s, t, 2.0)
    loss0, parts0 = losses.kd_loss(s, t, y, 2.0, 0.0)
    assert torch.allclose(loss0, ce) and set(parts0) == {"hard"}
    loss1, parts1 = losses.kd_loss(s, t, y, 2.0, 1.0)
    assert torch.allclose(loss1, soft, atol=1e-6) and set(parts1) == {"soft"}
    loss_mix, _ = losses.kd_loss(s, t, y, 2.0, 0.3)
    assert torch.allclose(loss_mix, 0.3 * soft + 0.7 * ce, atol=1e-6)
    with pytest.raises(ValueError):
        losses.kd_loss(s, None, y, 2.0, 0.5)


def test_hard_label_loss_skips_ignored_positions():
    logits = torch.randn(2, 3, 4)
    labels = torch.full((2, 3), -100)
    labels[0, 1] = 2
    assert torch.allclose(losses.hard_label_loss(logits, labels), F.cross_entropy(logits[0, 1:2], labels[0, 1:2]))
    assert float(losses.hard_label_loss(logits, torch.full((2, 3), -100))) == 0.0


def _value(loss):
    return float(loss.detach())


def test_hidden_mse_through_projection_with_padding_masked():
    g = torch.Generator().manual_seed(4)
    teacher = torch.randn(2, 4, 6, generator=g)
    teacher[..., 4:] = 0  # what a 4-wide student sliced from this teacher can reproduce exactly
    student = teacher[..., :4].clone()
    proj = losses.Projection(4, 6)  # starts as the zero-padded identity
    assert _value(losses.hidden_mse_loss(student, teacher, projection=proj)) == pytest.approx(0.0, abs=1e-7)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    noisy = student.clone()
    noisy[0, 3] += 5.0
    noisy[1, 2:] -= 3.0  # only padding changed
    assert _value(losses.hidden_mse_loss(noisy, teacher, mask, proj)) == pytest.approx(0.0, abs=1e-7)
    noisy[0, 0, 0] += 1.0  # one real position, one feature: 1 / (5 positions x 6 features)
    assert _value(losses.hidden_mse_loss(noisy, teacher, mask, proj)) == pytest.approx(1 / 30, rel=1e-5)
    with pytest.raises(ValueError, match="projection"):
        losses.hidden_mse_loss(student, teacher)
    # the projection learns: its weight receives a gradient
    losses.hidden_mse_loss(noisy, teacher, mask, proj).backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0


def test_hidden_state_loss_follows_the_layer_map():
    a = [torch.zeros(1, 2, 3), torch.ones(1, 2, 3), 2 * torch.ones(1, 2, 3)]
    b = [torch.zeros(1, 2, 3), 2 * torch.ones(1, 2, 3), 5 * torch.ones(1, 2, 3)]
    assert float(losses.hidden_state_loss(a, b, [[0, 0], [2, 1]])) == pytest.approx(0.0)
    assert float(losses.hidden_state_loss(a, b, [[1, 1], [2, 2]])) == pytest.approx((1 + 9) / 2)


def _attn(mask, heads=2, seed=5):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(mask.shape[0], heads, mask.shape[1], mask.shape[1], generator=g)
    scores = scores.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
    return torch.softmax(scores, -1)


def test_attention_loss_ignores_padding():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    t, s = _attn(mask, seed=5), _attn(mask, seed=6)
    assert float(losses.attention_loss(t, t, mask)) == pytest.approx(0.0, abs=1e-6)
    base = losses.attention_loss(s, t, mask)
    assert math.isfinite(float(base)) and float(base) > 0
    # garbage in padded query rows changes nothing
    s2 = s.clone()
    s2[0, :, 3] = torch.tensor([0.0, 0.0, 0.0, 1.0])
    s2[1, :, 2:] = 0.25
    assert torch.allclose(losses.attention_loss(s2, t, mask), base, atol=1e-6)
    # the value is the mean over real query rows of KL(teacher row || student row)
    rows = []
    for b in range(2):
        n = int(mask[b].sum())
        for h in range(2):
            for q in range(n):
                p, r = t[b, h, q, :n], s[b, h, q, :n]
                rows.append(float((p * (p.log() - r.log())).sum()))
    assert float(base) == pytest.approx(sum(rows) / len(rows), rel=1e-4)


def test_attention_loss_with_different_head_counts_compares_head_means():
    mask = torch.ones(1, 3, dtype=torch.long)
    t = _attn(mask, heads=4, seed=7)
    s = t.mean(1, keepdim=True).expand(1, 2, 3, 3)  # two heads, each equal to the teacher's head mean
    assert float(losses.attention_loss(s, t, mask)) == pytest.approx(0.0, abs=1e-6)


def test_cosine_loss():
    x = torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert float(losses.cosine_loss(x, 3 * x, mask)) == pytest.approx(0.0, abs=1e-6)
    assert float(losses.cosine_loss(x, -x, mask)) == pytest.approx(2.0, abs=1e-6)
    y = x.clone()
    y[0, 2] = -x[0, 2]  # padding
    assert float(losses.cosine_loss(x, y, mask)) == pytest.approx(0.0, abs=1e-6)


def test_similarity_kd_compares_structure_not_width():
    g = torch.Generator().manual_seed(8)
    teacher = torch.randn(6, 8, generator=g)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    student = (teacher @ q)[:, :8] * 2.5  # a rotation and a scale keep every cosine
    assert float(losses.similarity_kd_loss(student, teacher, 0.05)) == pytest.approx(0.0, abs=1e-4)
    shuffled = student[torch.tensor([1, 0, 2, 3, 4, 5])]
    assert float(losses.similarity_kd_loss(shuffled, teacher, 0.05)) > 0.1
    narrow = torch.randn(6, 3, generator=g)  # widths may differ
    assert math.isfinite(float(losses.similarity_kd_loss(narrow, teacher, 0.1)))
    assert float(losses.similarity_kd_loss(student[:1], teacher[:1], 0.05)) == 0.0  # no other sentence to compare with


def test_embedding_loss_kinds():
    t = torch.randn(3, 6)
    s = t[:, :4].clone()
    t2 = t.clone()
    t2[:, 4:] = 0
    proj = losses.Projection(4, 6)
    assert _value(losses.embedding_loss(s, t2, "mse", proj)) == pytest.approx(0.0, abs=1e-7)
    assert _value(losses.embedding_loss(s, t2, "cosine", proj)) == pytest.approx(0.0, abs=1e-6)
