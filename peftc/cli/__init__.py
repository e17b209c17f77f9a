"""The `peftc` command line (also `python -m peftc`); the entry point is peftc.cli.main:main."""
