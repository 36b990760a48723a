"""Module paths from before the package layout, kept importable for one release.

`import fracfx.modules` (or `from fracfx.quant import fake_quant`) still works: it warns with a
DeprecationWarning naming the new path and hands back the module that now lives there, the same
object, so isinstance checks and monkeypatches see one module.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

MOVED = {
    "fracfx.quant": "fracfx.nn.quant",
    "fracfx.modules": "fracfx.nn.quantizers",
    "fracfx.dfq_modules": "fracfx.nn.mixed",
    "fracfx.gates": "fracfx.nn.gates",
    "fracfx.attention": "fracfx.nn.attention",
    "fracfx.frozen": "fracfx.nn.frozen",
    "fracfx.text_data": "fracfx.data.text",
    "fracfx.verify": "fracfx.export.verify",
    "fracfx.test_accuracy": "fracfx.export.accuracy",
    "fracfx.commands": "fracfx.cli",
    "fracfx.commands.bench": "fracfx.cli.bench",
    "fracfx.commands.demo": "fracfx.cli.demo",
    "fracfx.commands.export": "fracfx.cli.export",
    "fracfx.commands.inspect": "fracfx.cli.inspect",
    "fracfx.commands.report": "fracfx.cli.report",
    "fracfx.commands.train": "fracfx.cli.train",
    "fracfx.train_dfq": "fracfx.train.methods.dfq",
    "fracfx.train_text": "fracfx.train.tasks",
    "fracfx.report": "fracfx.train.report",
    "fracfx.passes.analyze_cost": "fracfx.cost_model",
    "fracfx.passes.export_onnx": "fracfx.export.onnx_model",
    "fracfx.passes.onnx_qdq": "fracfx.export.qdq",
}


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target
        self.module = None
        self.spec = None

    def create_module(self, spec):
        self.module = importlib.import_module(self.target)
        self.spec = self.module.__spec__
        return self.module

    def exec_module(self, module) -> None:
        # the import system stamped the old name's spec on the module: give it back its own
        module.__spec__ = self.spec


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Resolves the old module paths in MOVED to their new homes, with a DeprecationWarning."""

    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        warnings.warn(f"{fullname} moved to {new}; the old path will be removed in the next release",
                      DeprecationWarning, stacklevel=2)
        return importlib.machinery.ModuleSpec(fullname, _Alias(new))


def install() -> None:
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())  # before PathFinder, which would load a second copy


def moved_names(old_module: str, table: dict[str, str]):
    """A module-level __getattr__ for names that moved out of `old_module`: name -> new module.

    Each access warns (DeprecationWarning naming the new path) and returns the object itself.
    """

    def __getattr__(name: str):
        if name not in table:
            raise AttributeError(f"module {old_module!r} has no attribute {name!r}")
        new = table[name]
        warnings.warn(f"{old_module}.{name} moved to {new}.{name}; the old path will be removed in the next release",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(new), name)

    return __getattr__
