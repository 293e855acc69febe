"""``python -m sandbay``: the same as the ``sandbay`` command."""

import sys

from ._cli import main

sys.exit(main())
