"""``python -m cli``: the same as the ``octomed-data`` console script."""

import sys

from cli import main

sys.exit(main())
