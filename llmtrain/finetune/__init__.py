"""Fine-tuning objectives that sit above the trainer (like `llmtrain.compress`): preference tuning (DPO,
`dpo.py`) against a frozen reference model (`reference.py`). Chat SFT needs no objective of its own: prepared
chat data carries `labels` = -100 on every token that is not trained on, and the family's loss honours it."""
