"""``python -m bitfx`` is the ``bitfx`` command."""
from bitfx.cli import main

raise SystemExit(main())
