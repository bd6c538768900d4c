"""``qgalore-fx pretrain ARGS`` that stops before a given step, for tests that kill it there.

    python tests/pretrain_worker.py STEP pretrain ARGS...

runs the command line unchanged, except that when the batch of step STEP is requested (steps
1..STEP-1 and their metrics and checkpoints are complete) it prints ``paused before step STEP``
and sleeps until it is killed.
"""

from __future__ import annotations

import sys
import time

from qgalore_fx.app import cli
from qgalore_fx.app import data as data_lib


def main() -> int:
    stop_at, argv = int(sys.argv[1]), sys.argv[2:]
    random_batches = data_lib.random_batches

    def stopping_batches(*args, **kwargs):
        for step, batch in enumerate(random_batches(*args, **kwargs), start=1):
            if step == stop_at:
                print(f"paused before step {step}", flush=True)
                while True:
                    time.sleep(60)
            yield batch

    data_lib.random_batches = stopping_batches
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
