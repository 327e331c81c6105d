"""The type of what `build_data` returns: the calls the trainer makes on it (DEVELOPERS.md, "Data contract").

CausalData, BertData, SourceClassData and StreamingData each satisfy it; type checkers verify that where
`build_data` returns them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from llmtrain.data.tokenizer import Tokenizer


class RunData(Protocol):
    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def vocab_size(self) -> int: ...

    def check_model_vocab(self, model_vocab_size: int) -> None: ...

    def check_eval(self, n: int) -> None: ...

    def train_batches(self, step: int) -> list[dict[str, Any]]:
        """The grad_accum micro-batches of optimizer step `step` (0-based) for this data-parallel rank."""
        ...

    def val_batches(self, n: int) -> list[dict[str, Any]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, d: dict[str, Any]) -> None: ...
