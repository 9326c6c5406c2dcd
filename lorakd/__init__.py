"""lorakd: budgeted LoRA text classifiers with teacher-student distillation.

The Python API (lorakd/api.py) is here too, loaded on first use so that `import lorakd` imports no torch:
lorakd.load_config, train, pipeline, evaluate, predict, predict_file, export and their result classes.
lorakd/package.py holds the version, the start time and the API's names; this file hands them on."""
import importlib

from .package import API, CALLABLE_MODULES, STARTED, __version__  # noqa: F401


def __getattr__(name):
    if name in CALLABLE_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *API})
