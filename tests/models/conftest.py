"""tests/models: the model zoo, generation, evaluation and Hugging Face interop."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `from helpers import ...` as in tests/
