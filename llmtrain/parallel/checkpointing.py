"""Activation checkpointing applied from outside: recompute activations in backward instead of keeping them.

Modes (`parallel.activation_checkpointing`):
    none       keep everything (fastest, most memory)
    full       each transformer block keeps only its input; the whole block is recomputed in backward
    selective  only the attention core (`attn.attend`: softmax(QK^T)V) is recomputed: the part whose
               activations grow with s^2, at a small fraction of the FLOPs (Korthikanti et al. 2022)
    every_n    `full` on every n-th block (blocks 0, n, 2n, ...): a dial between none and full

The model is not changed structurally: the block's (or attention core's) `forward` is replaced on the
instance by a checkpointed call of the original, so parameter names, state dicts and ZeRO-3 hooks stay
as they were. torch's non-reentrant checkpoint is used: it works with ZeRO-3 (parameters gathered again
by their hooks during recompute) and inside pipeline stages whose inputs do not require grad (the
reentrant variant fails there with "element 0 of tensors does not require grad").
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch
from torch.utils.checkpoint import checkpoint

from llmtrain.errors import UserError

MODES = ("none", "full", "selective", "every_n")


def apply_activation_checkpointing(model: torch.nn.Module, mode: str, every_n: int = 2) -> list[str]:
    """Checkpoint the blocks of `model` per `mode`, in place. Returns the names of what was wrapped.

    The model must expose its transformer blocks as `model.blocks`, and for `selective` each block an
    attention module `attn` with an `attend(q, k, v)` method (the attention core).
    """
    if mode not in MODES:
        raise UserError(f"parallel.activation_checkpointing must be one of {', '.join(MODES)}; got {mode!r}")
    if mode == "none":
        return []
    if mode == "every_n" and every_n < 1:
        raise UserError(f"parallel.checkpoint_every_n must be >= 1; got {every_n}")
    blocks = _blocks(model)
    wrapped = []
    for i, block in enumerate(blocks):
        if mode == "full" or (mode == "every_n" and i % every_n == 0):
            _checkpoint_method(block, "forward")
            wrapped.append(f"blocks.{i}")
        elif mode == "selective":
            attn = getattr(block, "attn", None)
            if attn is None or not hasattr(attn, "attend"):
                raise UserError(
                    f"selective activation checkpointing needs blocks.{i}.attn.attend "
                    f"(the attention core); {type(block).__name__} has none: use full"
                )
            _checkpoint_method(attn, "attend")
            wrapped.append(f"blocks.{i}.attn.attend")
    return wrapped


def _blocks(model: torch.nn.Module) -> Iterable[torch.nn.Module]:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, torch.nn.ModuleList):
        raise UserError(
            f"{type(model).__name__} has no `blocks` ModuleList; activation checkpointing wraps transformer blocks"
        )
    return blocks


# SavedBytes instances currently counting. Tensors saved inside a checkpointed region go to the
# checkpoint's own saved-tensor hooks (never stored); the region's inputs are what it keeps instead.
_KEPT_LISTENERS: list[Callable[[list[torch.Tensor]], None]] = []


def _checkpoint_method(module: torch.nn.Module, name: str) -> None:
    original: Callable = getattr(module, name)
    if getattr(original, "_llmtrain_checkpointed", False):
        return  # applied twice (e.g. a model reused in a test): keep one level of recompute

    @functools.wraps(original)
    def checkpointed(*args, **kwargs):
        if not torch.is_grad_enabled():  # eval / generation: nothing to save, nothing to recompute
            return original(*args, **kwargs)
        for listener in _KEPT_LISTENERS:  # the inputs are what a checkpointed region keeps alive
            listener([a for a in args if isinstance(a, torch.Tensor)])
        return checkpoint(original, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)

    setattr(checkpointed, "_llmtrain_checkpointed", True)
    setattr(module, name, checkpointed)


class SavedBytes:
    """Counts the bytes autograd saves for backward inside the context (unique storages only).

    Tensors saved twice (e.g. a weight used by two ops) or views of one buffer count once; parameters
    are excluded: they are model state, not activations. The inputs a checkpointed region keeps for
    its recompute are counted too.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._seen: set[int] = set()
        self.bytes = 0

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in self._exclude and key not in self._seen and t.device.type != "meta":
            self._seen.add(key)
            self.bytes += storage.nbytes()
        return t

    def __enter__(self) -> SavedBytes:
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        _KEPT_LISTENERS.append(self._keep)
        return self

    def _keep(self, tensors: list[torch.Tensor]) -> None:
        for t in tensors:
            self._pack(t)

    def __exit__(self, *exc) -> None:
        _KEPT_LISTENERS.remove(self._keep)
        self._ctx.__exit__(*exc)
