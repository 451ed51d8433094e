"""Data: GLUE (local glue_data TSVs or the hub) and multiple-choice QA (memtl.data.qa), as
Lightning DataModules, on the shared loading parts (memtl.data.loading). ``get_task`` looks
either kind of task up by name."""

from memtl.data.glue import GLUE_TASKS, GlueDataModule, GlueTask, read_glue_split, read_glue_tsv
from memtl.data.glue import get_task as get_glue_task
from memtl.data.loading import default_data_root
from memtl.data.qa import QA_TASKS, QADataModule, QATask, get_qa_task, is_qa_task, read_qa_split
from memtl.errors import ConfigError


def get_task(name, main_metric: str | None = None, length_norm: str | None = None):
    """A GLUE task ("rte", "glue/rte") or a QA task ("arc_easy", "qa/arc_easy"); ``length_norm``
    (QA only) overrides how an LM backbone's choice log-likelihoods are normalised."""
    if is_qa_task(name):
        return get_qa_task(name, main_metric, length_norm)
    if isinstance(name, GlueTask) or str(name).lower().removeprefix("glue/").replace("-", "").replace("_", "") \
            in GLUE_TASKS:
        if length_norm is not None:
            raise ConfigError(f"task.length_norm is a QA option; remove it from GLUE task {name!r}")
        return get_glue_task(name, main_metric)
    raise ConfigError(f"unknown task {name!r}; set task.name to one of "
                      f"{', '.join([*GLUE_TASKS, *QA_TASKS])} (GLUE, then multiple-choice QA)")


__all__ = ["GLUE_TASKS", "GlueDataModule", "GlueTask", "QA_TASKS", "QADataModule", "QATask", "default_data_root",
           "get_qa_task", "get_task", "read_glue_split", "read_glue_tsv", "read_qa_split"]
