"""The ``lowrank`` commands, one module each (demo, train, inspect, analyze; cli.py is the entry
point), with what only they use (experiment, variants, report, plots, progress)."""
