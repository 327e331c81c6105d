"""Train a model from a recipe.

    python     launchers/train.py recipes/gpt_debug.yaml train.max_steps=50 out_dir=runs/a
    deepspeed  [--num_gpus N] launchers/train.py recipes/gpt_debug.yaml ...
    torchrun   --nproc_per_node N launchers/train.py recipes/gpt_debug.yaml ...

Dotted key=value overrides follow the recipe (CLI > YAML > defaults). `--help` lists the options.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

from llmtrain.train.orphan import watch_launcher  # noqa: E402

watch_launcher()  # first, before torch loads: a rank never outlives (nor waits for) a dead launcher

from llmtrain.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
