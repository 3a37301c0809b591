"""``python -m rwkvkit.train`` and ``torchrun --nproc_per_node=N -m rwkvkit.train``: ``rwkvkit train``."""

from rwkvkit.train.trainer import main

raise SystemExit(main())
