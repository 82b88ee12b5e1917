"""The ``lowrank`` commands, one module each (cli.py is the entry point and lists them in
``COMMANDS``), with what only they use (experiment, variants, report, plots, progress, allocator)."""
