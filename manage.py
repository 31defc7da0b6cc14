#!/usr/bin/env python3
"""AetherCore admin CLI (`python manage.py --help`); the verbs live in cli/, one module per group."""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from cli import app

    app()
