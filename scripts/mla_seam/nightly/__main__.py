"""``python -m mla_seam.nightly``: the nightly drift job (see the package doc)."""

from mla_seam.nightly import main

raise SystemExit(main())
