"""``python -m mla_seam`` runs the CLI."""

from mla_seam.cli import main

raise SystemExit(main())
