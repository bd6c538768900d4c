"""``qgalore-fx pretrain ARGS`` that stops at a given point, for tests that kill it there.

    python tests/pretrain_worker.py STEP pretrain ARGS...
    python tests/pretrain_worker.py save:STEP pretrain ARGS...       (under torchrun)

runs the command line unchanged, except that it prints ``paused before step STEP (pid PID)`` and sleeps until it
is killed

- ``STEP``: when the batch of step STEP is requested (steps 1..STEP-1 and their metrics and checkpoints are
  complete);
- ``save:STEP``: in the distributed checkpoint of step STEP, once ``dcp.save`` has written its files on every
  rank and before the run records it as the latest (a process killed during a save).
"""

from __future__ import annotations

import os
import sys
import time

from qgalore_fx.app import cli
from qgalore_fx.app import data as data_lib


def pause(step: int):
    print(f"paused before step {step} (pid {os.getpid()})", flush=True)
    while True:
        time.sleep(60)


def main() -> int:
    where, argv = sys.argv[1], sys.argv[2:]
    if where.startswith("save:"):
        import torch.distributed.checkpoint as dcp

        stop_at, save = int(where.removeprefix("save:")), dcp.save

        def stopping_save(state, *, checkpoint_id, **kwargs):
            result = save(state, checkpoint_id=checkpoint_id, **kwargs)
            if str(checkpoint_id).endswith(f"step-{stop_at:06d}"):
                pause(stop_at + 1)
            return result

        dcp.save = stopping_save
        return cli.main(argv)

    stop_at, random_batches = int(where), data_lib.random_batches

    def stopping_batches(*args, **kwargs):
        for step, batch in enumerate(random_batches(*args, **kwargs), start=1):
            if step == stop_at:
                pause(step)
            yield batch

    data_lib.random_batches = stopping_batches
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
