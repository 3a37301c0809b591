"""``python -m rwkvkit.demo`` (``make demo``): the demo's flags are in the command-line package."""

from rwkvkit.cli.demo import main

raise SystemExit(main())
