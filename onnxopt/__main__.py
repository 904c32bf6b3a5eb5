"""``python -m onnxopt`` runs the CLI."""

import sys

from onnxopt.cli import main

# Guarded: --isolate's child processes import the main module again (multiprocessing).
if __name__ == "__main__":
    sys.exit(main())
