"""``python -m recsys ...``: the ``recsys`` command, the form torchrun launches (``torchrun ... -m recsys train``)."""

import os
import sys

from recsys import distributed
from recsys.cli import main

launched = distributed.launched()
code = main()
if launched:
    # A rank has left its process group by now. Interpreter teardown then destroys torch's C++ objects in an
    # order that sometimes aborts the process ("terminate called without an active exception", seen here about
    # once in five 2-rank jobs) after the work is done and written: exit without that teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
