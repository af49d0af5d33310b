"""Tasks: what classification, segmentation and detection each supply to `biformer train`, `eval` and
`predict` (`base.Task`), the list that says which task a model name or a weights file belongs to, and `eval` and
`predict` as functions (`evaluate`, `predict`)."""
from .base import NoOptions, Objective, Prediction, Restored, Task
from .inference import evaluate, predict
from .registry import TASKS, register_task, restore, task_for_checkpoint, task_for_model, unregister_task

__all__ = ["TASKS", "NoOptions", "Objective", "Prediction", "Restored", "Task", "evaluate", "predict",
           "register_task", "restore", "task_for_checkpoint", "task_for_model", "unregister_task"]
