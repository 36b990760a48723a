"""Module paths from before the package layout still import, warn, and give the new module."""

import importlib
import sys

import pytest

from fracfx._moved import MOVED


@pytest.mark.parametrize("old,new", sorted(MOVED.items()))
def test_old_path_warns_and_is_the_new_module(old, new):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert module.__spec__.name == new  # the module keeps its own identity


def test_old_names_of_run_accuracy_warn():
    from fracfx.export import accuracy

    with pytest.warns(DeprecationWarning, match="run_accuracy"):
        assert accuracy.test_set_accuracy is accuracy.run_accuracy
