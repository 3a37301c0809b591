"""``python -m rwkvkit``: the same as the ``rwkvkit`` command."""

import sys

from rwkvkit.cli import main

sys.exit(main())
