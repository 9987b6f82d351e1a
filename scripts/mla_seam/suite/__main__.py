"""``python -m mla_seam.suite``: the suite verb alone (no GitPython needed to run phases)."""

from mla_seam.suite.command import main

raise SystemExit(main())
