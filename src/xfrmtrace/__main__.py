"""``python -m xfrmtrace``."""

from xfrmtrace.cli import main

raise SystemExit(main())
