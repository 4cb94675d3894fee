"""``python -m unipruning_modifier.cli``: the ``unipruning`` command."""

import sys

from . import main

sys.exit(main())
