"""``python -m mla_seam.suite_dist``: the multi-GPU phase on its own."""

from mla_seam.suite_dist import main

raise SystemExit(main())
