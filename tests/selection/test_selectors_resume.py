"""A run resumed from a checkpoint draws the same random selections as the uninterrupted run."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from forkwatch.plugin.selection.registry import Selection, get_selector, registered_selector

import forkwatch


@pytest.fixture
def recorded_random():
    """`select="recorded_random"`: the built-in `random` (no warm-up), every selection appended to a list."""
    seen: list[tuple[int, torch.Tensor]] = []
    inner = get_selector("random", fraction=0.3, warmup_steps=0)

    def recorded(inp) -> Selection:
        sel = inner(inp)
        seen.append((inp.step, sel.weights.clone()))
        return sel

    with registered_selector("recorded_random", recorded):
        yield seen


def _train(make_trainer, tmp_path, out, logs, *, resume=None):
    trainer = make_trainer(max_steps=4, save_strategy="steps", save_steps=2, output_dir=out)
    forkwatch.attach(trainer, log_dir=str(tmp_path / logs), run_name=logs, select="recorded_random", seed=11)
    trainer.train(resume_from_checkpoint=resume)


def _after(seen, step):
    return [w for s, w in seen if s >= step]


def test_resumed_run_draws_the_same_selections_as_the_uninterrupted_run(make_trainer, tmp_path, recorded_random,
                                                                       caplog):
    out = str(tmp_path / "out")
    _train(make_trainer, tmp_path, out, "whole")
    whole = _after(recorded_random, 2)  # optimizer steps 3 and 4
    checkpoint = os.path.join(out, "checkpoint-2")
    assert os.path.isfile(os.path.join(checkpoint, "forkwatch_select_rng_0.pt"))

    recorded_random.clear()
    _train(make_trainer, tmp_path, str(tmp_path / "out_b"), "resumed", resume=checkpoint)
    resumed = _after(recorded_random, 0)
    assert len(resumed) == len(whole) > 0
    assert all(torch.equal(a, b) for a, b in zip(whole, resumed, strict=True))

    # Without the saved state the resumed draws differ (and the user is told), so the equality above is earned.
    os.remove(os.path.join(checkpoint, "forkwatch_select_rng_0.pt"))
    recorded_random.clear()
    with caplog.at_level(logging.WARNING, logger="forkwatch"):
        _train(make_trainer, tmp_path, str(tmp_path / "out_c"), "fresh", resume=checkpoint)
    fresh = _after(recorded_random, 0)
    assert any(not torch.equal(a, b) for a, b in zip(whole, fresh, strict=True))
    assert "selections will differ" in caplog.text
