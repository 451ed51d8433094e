"""Data: GLUE (local glue_data TSVs or the hub) as a Lightning DataModule."""

from memtl.data.glue import (
    GLUE_TASKS,
    GlueDataModule,
    GlueTask,
    default_data_root,
    get_task,
    read_glue_split,
    read_glue_tsv,
)

__all__ = ["GLUE_TASKS", "GlueDataModule", "GlueTask", "default_data_root", "get_task", "read_glue_split",
           "read_glue_tsv"]
