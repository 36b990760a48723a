"""`python -m tests.train.killed ITERATION RANK fracfx-args...`: `fracfx` in a process that is
SIGKILLed right after training iteration ITERATION (its optimizer step), as in a real crash: no
cleanup code runs and the iterations since the last checkpoint are lost. Under torchrun only
rank RANK dies, and only in torchrun's first attempt (an elastic restart runs to the end).

The kill comes from the test side: production code has no hook for it.
"""

from __future__ import annotations

import os
import signal
import sys


def main(argv: list[str]) -> int:
    iteration, rank, rest = int(argv[0]), int(argv[1]), argv[2:]
    from fracfx.cli import main as fracfx_main
    from fracfx.train.session import Session

    here = int(os.environ.get("RANK", "0")) == rank and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0
    step = Session.step

    def step_then_die(self, *args):
        loss = step(self, *args)
        if here and self.iteration == iteration:
            os.kill(os.getpid(), signal.SIGKILL)
        return loss

    Session.step = step_then_die
    return fracfx_main(rest)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
