"""``python -m cvserve``: the ``cvserve`` command."""

import sys

from cvserve.cli.main import main

sys.exit(main())
