"""`python -m peftc ...`: the same as the `peftc` console script."""

from peftc.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
