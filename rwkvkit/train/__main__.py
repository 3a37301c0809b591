"""``python -m rwkvkit.train`` and ``torchrun --nproc_per_node=N -m rwkvkit.train``: ``rwkvkit train``."""

import sys

from rwkvkit.cli import main

raise SystemExit(main(["train", *sys.argv[1:]]))
