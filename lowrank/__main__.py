"""``python -m lowrank``: the ``lowrank`` command."""
from .app.cli import main

raise SystemExit(main())
