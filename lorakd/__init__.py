"""lorakd: budgeted LoRA text classifiers with teacher-student distillation.

The Python API (lorakd/api.py) is here too, loaded on first use so that `import lorakd` imports no torch:
lorakd.load_config, train, pipeline, evaluate, predict, predict_file, export and their result classes."""
import importlib
import sys
import types
import time

STARTED = time.perf_counter()  # lorakd's start: run.json's phases_s.start counts from here, not from process start

__version__ = "0.1.0"

API = ("load_config", "train", "pipeline", "evaluate", "predict", "predict_file", "export", "TrainResult",
       "EvalResult", "Predictions", "PredictFileResult", "ExportResult", "PipelineResult")
# API calls that share their name with a submodule: lorakd.train is the module lorakd/train.py, made callable
CALLABLE_MODULES = ("train", "pipeline", "evaluate", "predict", "export")


class CallableModule(types.ModuleType):
    """A submodule that is also the API call of its name: lorakd.train(cfg) runs lorakd.api.train, while
    `from lorakd import train` and lorakd.train.train stay what they were."""

    def __call__(self, *args, **kwargs):
        from . import api

        return getattr(api, self.__name__.rpartition(".")[2])(*args, **kwargs)


def callable_module(name: str):
    """Called at the end of each module in CALLABLE_MODULES, however it was first imported."""
    sys.modules[name].__class__ = CallableModule


def __getattr__(name):
    if name in CALLABLE_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *API})
