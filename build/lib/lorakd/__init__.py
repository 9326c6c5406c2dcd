"""lorakd: budgeted LoRA text classifiers with teacher-student distillation."""

__version__ = "0.1.0"
RUN_FORMAT = 1  # bumped when a run folder's layout changes incompatibly
