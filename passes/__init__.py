"""The built-in passes, one per file. Importing this package imports every module in it, and each
registers its pass by name: a new pass needs only its own file."""
import importlib
import pkgutil

from rewrite.graph.pipeline import available, create, option_names

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["available", "create", "option_names"]
