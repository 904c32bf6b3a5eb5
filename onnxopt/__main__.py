"""``python -m onnxopt`` runs the CLI."""

import sys

from onnxopt.cli import main

sys.exit(main())
