"""Prompt data: files -> validated rows -> rendered, tokenised records -> resumable batches.

    dataset = PromptDataset(config.data, tokenizer)   # loads and validates every row
    loader = PromptLoader(dataset, prompts_per_step)  # endless; state_dict() for checkpoints
    batch = shard_batch(next(loader), dp_rank, dp_size)
"""

from pipeline.data.config import DataConfig, DataError
from pipeline.data.loader import PromptLoader, shard_batch
from pipeline.data.prompts import PromptDataset, PromptRecord, Skipped

__all__ = ["DataConfig", "DataError", "PromptDataset", "PromptLoader", "PromptRecord", "Skipped", "shard_batch"]
