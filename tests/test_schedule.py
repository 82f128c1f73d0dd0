"""The shared training schedule (cm3.core.schedule): warm-up then decay, and "N steps or S seconds"."""

from __future__ import annotations

import math

import pytest

from cm3.core.schedule import StepBudget, decay, warmup_then_decay
from cm3.model.config import CM3Config
from cm3.model.train_step import learning_rate, warmup_for


def test_the_decoders_learning_rate_is_metaseqs_linear_schedule():
    config = CM3Config(vocab_size=64, n_layers=1, d_model=8, n_heads=1, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    total = 200
    warm = warmup_for(config, total)
    for step in (0, 5, warm - 1, warm, 100, total - 1, total, total + 50):
        expected = (config.lr * (step + 1) / warm if step < warm else
                    config.lr * (1 - 0.9 * min(1.0, (step - warm) / (total - warm))))
        assert learning_rate(step, config, total) == pytest.approx(expected, rel=1e-12)


def test_warm_up_rises_to_the_peak_then_decays_to_the_floor():
    factors = [warmup_then_decay(step, 100, 10, "cosine", floor=0.05) for step in range(120)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(factors[:10], factors[1:10]))  # rising
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))  # then falling
    assert factors[100] == factors[119] == pytest.approx(0.05)
    assert decay(0.5, "cosine") == pytest.approx(0.5) and decay(0.5, "linear", floor=0.2) == pytest.approx(0.6)
    assert warmup_then_decay(0.5, 1.0, 0.1, "cosine", offset=1e-3) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 9)))
    with pytest.raises(ValueError, match="cosine or linear"):
        decay(0.5, "step")


def test_the_budget_ends_at_the_nearer_of_steps_and_seconds():
    assert StepBudget(steps=100).progress(25) == pytest.approx(0.25)
    assert StepBudget(steps=100).progress(100) == 1.0
    resumed = StepBudget(steps=100, seconds=10.0, elapsed_before=8.0)  # a run resumed with 2 s of its budget left
    assert resumed.progress(1) >= 0.8 and resumed.elapsed() >= 8.0
    assert StepBudget(steps=100, seconds=10.0, elapsed_before=10.0).progress(1) >= 1.0
