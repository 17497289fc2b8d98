"""Task-level routing (Task-MoE): an offline multi-task corpus, a trainer that passes task ids, and
the extraction of one task's sub-network into a smaller standalone model."""

from moekit.tasks.data import TASK_NAMES, TaskBatchSampler, TaskSet, build_task_corpus
from moekit.tasks.extract import extract_task, task_expert_table
from moekit.tasks.trainer import TaskTrainer

__all__ = [
    "TASK_NAMES",
    "TaskBatchSampler",
    "TaskSet",
    "TaskTrainer",
    "build_task_corpus",
    "extract_task",
    "task_expert_table",
]
