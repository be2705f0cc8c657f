"""Every docstring example in the library runs and prints what it says."""

import doctest
import importlib
import pkgutil

import pytest

import gradclip_jax

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(gradclip_jax.__path__, "gradclip_jax.")
    if not m.name.startswith("gradclip_jax._cli")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_public_api_has_examples():
    for name in gradclip_jax.__all__:
        obj = getattr(gradclip_jax, name)
        if callable(obj) and not isinstance(obj, type):
            assert ">>>" in (obj.__doc__ or ""), f"{name} has no runnable example"
