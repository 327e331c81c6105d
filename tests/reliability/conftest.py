"""tests/reliability: attacks on checkpoints, data and processes; each test names the defect it pins."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `from helpers import ...` as in tests/
