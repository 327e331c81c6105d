"""tests/train: training objectives (DPO), through the real launchers where it matters (tests/helpers.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `from helpers import ...` as in tests/
