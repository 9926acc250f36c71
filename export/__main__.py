"""python -m export SOURCE --out DIR ...: the same arguments as `hermes export` (hermes_ort_export)."""
import sys

from hermes_ort_export.__main__ import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m export"))
