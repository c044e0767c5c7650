"""ortho-run with one fault on one rank, for the data-parallel tests (run under torchrun):
``FAULT=nan`` makes the training loss of rank ``FAULT_RANK`` non-finite at its ``FAULT_STEP``-th
loss, ``FAULT=signal`` sends that rank SIGTERM there; the other ranks see nothing."""

import os
import signal
import sys

from ortho_run.methods.ce import CE

_real = CE.loss
_calls = {"n": 0}
_here = int(os.environ.get("RANK", "0")) == int(os.environ.get("FAULT_RANK", "1"))
_at = int(os.environ.get("FAULT_STEP", "5"))


def _loss(self, out, batch):
    parts = _real(self, out, batch)
    _calls["n"] += 1
    if _here and _calls["n"] == _at:
        if os.environ["FAULT"] == "nan":
            parts = {k: v * float("nan") for k, v in parts.items()}
        else:
            os.kill(os.getpid(), signal.SIGTERM)
    return parts


if __name__ == "__main__":
    CE.loss = _loss
    from ortho_run.cli import main

    sys.argv = ["ortho-run", *sys.argv[1:]]
    main()
