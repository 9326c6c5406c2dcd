"""lorakd: budgeted LoRA text classifiers with teacher-student distillation."""
import time

STARTED = time.perf_counter()  # lorakd's start: run.json's phases_s.start counts from here, not from process start

__version__ = "0.1.0"
RUN_FORMAT = 1  # bumped when a run folder's layout changes incompatibly
