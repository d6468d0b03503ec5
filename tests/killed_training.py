"""`python -m caer_jax.train` that kills itself (SIGKILL) at a chosen step and moment, so that
tests/test_faults.py controls where a kill hits instead of racing a running process.

    python tests/killed_training.py STEP MOMENT [caer_jax.train's flags]

MOMENT is `writing`: inside the save of step STEP's checkpoint, when orbax has begun writing it
and takes the data iterator's position (the checkpoint is never finalized); or `saved`: once
step STEP's checkpoint is completely on disk, before step STEP + 1.
"""

import os
import signal
import sys

from caer_jax import checkpoint, train

MOMENTS = ("writing", "saved")


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_at(step: int, moment: str) -> None:
    save = checkpoint.Checkpoints.save

    def save_and_die(self, state, **kwargs):
        if int(state.step) != step:
            return save(self, state, **kwargs)
        if moment == "writing":
            kwargs["data_iterator"].get_state = _die
        save(self, state, **kwargs)
        self.wait()
        _die()

    checkpoint.Checkpoints.save = save_and_die


if __name__ == "__main__":
    step, moment = int(sys.argv[1]), sys.argv[2]
    assert moment in MOMENTS, moment
    del sys.argv[1:3]
    _kill_at(step, moment)
    train.main()
