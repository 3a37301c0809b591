"""``python -m rwkvkit.eval_harness ARGS``: lm-eval's command line with the ``rwkvkit`` model registered
(the package is imported under its own name first, so the model is registered once)."""

from rwkvkit.eval_harness import main

raise SystemExit(main())
