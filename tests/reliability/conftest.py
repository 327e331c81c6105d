"""tests/reliability: attacks and accidents, each a test that failed on the code before its fix."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `from helpers import ...` as in tests/
