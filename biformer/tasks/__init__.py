"""Tasks: what classification, segmentation and detection each supply to `biformer train`, `eval` and
`predict` (`base.Task`), and the list that says which task a model name or a weights file belongs to."""
from .base import Objective, Restored, Task
from .registry import TASKS, register_task, restore, task_for_checkpoint, task_for_model, unregister_task

__all__ = ["TASKS", "Objective", "Restored", "Task", "register_task", "restore", "task_for_checkpoint",
           "task_for_model", "unregister_task"]
