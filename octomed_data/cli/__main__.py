"""``python -m octomed_data.cli``: the same as the ``octomed-data`` console script."""

import sys

from octomed_data.cli import main

sys.exit(main())
