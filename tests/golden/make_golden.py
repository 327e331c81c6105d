"""Regenerate the golden 1-rank losses (and gradient norms) that pin the tiny GPT's training numbers.

    .venv/bin/python tests/golden/make_golden.py

Run it only when a change is meant to change the numbers (a new init, a data format change) and say so
in the commit message; refactors and layout changes must keep them.
"""

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers import grad_norms, losses, train  # noqa: E402

STEPS = 6

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        train(Path(tmp) / "run", f"train.max_steps={STEPS}")
        golden = {
            "what": "per-step loss and gradient norm (before clipping) of the 1-rank ZeRO-0 fp32 tiny GPT "
            "(tests/helpers.py TINY)",
            "losses": {str(k): v for k, v in sorted(losses(Path(tmp) / "run").items())},
            "grad_norms": {str(k): v for k, v in sorted(grad_norms(Path(tmp) / "run").items())},
        }
    out = Path(__file__).with_name("gpt_tiny_zero_losses.json")
    out.write_text(json.dumps(golden, indent=1) + "\n")
    print(out.read_text())
