"""``python -m recsys ...``: the ``recsys`` command, the form torchrun launches (``torchrun ... -m recsys train``)."""

import sys

from recsys.cli import main

sys.exit(main())
