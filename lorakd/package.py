"""What `import lorakd` sets up, below every other module: the version, lorakd's start time, the API's names, and
the submodules that are also API calls (lorakd.train(cfg) runs lorakd.api.train; lorakd/__init__.py hands these on).
A stage module makes itself callable with callable_module(__name__): it imports this module, never the package."""
import importlib
import sys
import time
import types

STARTED = time.perf_counter()  # lorakd's start: run.json's phases_s.start counts from here, not from process start

__version__ = "0.1.0"

API = ("load_config", "train", "pipeline", "evaluate", "predict", "predict_file", "export", "TrainResult",
       "EvalResult", "Predictions", "PredictFileResult", "ExportResult", "PipelineResult")
# API calls that share their name with a submodule: lorakd.train is the module lorakd/train.py, made callable
CALLABLE_MODULES = ("train", "pipeline", "evaluate", "predict", "export")


class CallableModule(types.ModuleType):
    """A submodule that is also the API call of its name: lorakd.train(cfg) runs lorakd.api.train, while
    `from lorakd import train` and lorakd.train.train stay what they were. The API module is found by name when
    called: the stage modules sit below it, and api imports them."""

    def __call__(self, *args, **kwargs):
        package, _, name = self.__name__.rpartition(".")
        return getattr(importlib.import_module(f"{package}.api"), name)(*args, **kwargs)


def callable_module(name: str):
    """Called at the end of each module in CALLABLE_MODULES, however it was first imported."""
    sys.modules[name].__class__ = CallableModule
