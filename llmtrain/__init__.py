"""llmtrain: train, compress and serve large language models on DeepSpeed."""

__version__ = "0.1.0"
