"""The step-loop policy every training stage shares (training/runner.py: StageLoop): checkpoints every
ckpt_interval steps and at the end, never inside a streak of non-finite losses, and a "stopped" event with
nan_skipped when the guard gives up. main, gen and post run on it; their end-to-end divergence tests are in
test_main.py, test_gen.py and test_post.py."""

import json

import pytest
import torch

import tokpost_fast.training.runner as runner
from tokpost_fast.training.engine import DistInfo, NonFiniteGuard, NonFiniteLossError
from tokpost_fast.training.run_log import JsonlLog

NAN, ONE = torch.tensor(float("nan")), torch.tensor(1.0)


@pytest.fixture
def loop(tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(runner, "save_checkpoint", lambda folder, step, engines, state, info, keep: saved.append(
        (step, state["step"])))
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    guard = NonFiniteGuard(max_in_row=3, device=torch.device("cpu"))
    jsonl = JsonlLog(tmp_path / "log.jsonl", enabled=True)
    stage = runner.StageLoop(info, jsonl, guard, tmp_path, engines={}, state=lambda step: {"step": step},
                             ckpt_interval=2, keep=2)
    stage.saved = saved
    return stage


def steps(loop, losses, stop_at=None):
    """One guard check per step, the step counter advanced, checkpoint_if_due after each (as the stages do)."""
    for loss in losses:
        loop.guard.ok(loss)
        loop.step += 1
        loop.checkpoint_if_due(final=loop.step == stop_at)


def test_checkpoints_skip_a_non_finite_streak_and_resume_after_it(loop):
    steps(loop, [ONE, ONE, ONE, NAN, NAN, ONE])            # steps 4 and 5 end inside the streak
    assert loop.saved == [(2, 2), (6, 6)]
    loop.finish()                                          # step 6 is saved already
    assert loop.saved == [(2, 2), (6, 6)]


def test_final_checkpoint_is_skipped_when_the_run_ends_inside_a_streak(loop):
    steps(loop, [ONE, ONE, ONE, NAN], stop_at=4)
    loop.finish()
    assert loop.saved == [(2, 2)] and loop.last_saved == 2


def test_final_checkpoint_of_a_good_last_step(loop):
    steps(loop, [ONE, ONE, ONE], stop_at=3)
    loop.finish()
    assert loop.saved == [(2, 2), (3, 3)]


def test_the_guard_stop_is_logged_as_a_stopped_event_with_nan_skipped(loop, tmp_path):
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row"):
        with loop.stop_on_non_finite():
            steps(loop, [ONE, ONE, NAN, ONE, NAN, NAN, NAN])
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["event"].startswith("stopped: 3 non-finite losses")
    assert rows[-1]["nan_skipped"] == 4 and rows[-1]["step"] == 6
    assert loop.saved == [(2, 2), (4, 4)]                 # step 6 (inside the streak) was never saved
