"""Background tasks of the life cycle: the round check and the periodic sweep."""

from __future__ import annotations

from fedserve import config
from fedserve.rounds import deadlines, switch
from fedserve.tasks import periodic, task

CHECK_TASK = deadlines.CHECK_TASK
SWEEP_TASK = "rounds.sweep"
SWEEP_SECONDS = config.env_int("FEDSERVE_ROUND_SWEEP_SECONDS", 5, minimum=1)


@task(CHECK_TASK)
def check_round(training_id: str) -> None:
    """Move a training on if its current phase is over (idempotent)."""
    switch.check_round(training_id)


@task(SWEEP_TASK)
def sweep() -> None:
    """Re-drive trainings whose round is complete, whose deadline passed or whose claim lapsed."""
    deadlines.sweep()


periodic(SWEEP_TASK, SWEEP_SECONDS)
