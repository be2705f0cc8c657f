"""Every docstring example and every README code block runs; the docs name every public name."""

import doctest
import importlib
import pathlib
import pkgutil
import re

import numpy as np
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


def _readme_blocks():
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_code_blocks_run_in_order(capsys):
    blocks = _readme_blocks()
    assert len(blocks) >= 5
    namespace: dict = {}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as e:  # noqa: BLE001 - name the block that failed
            raise AssertionError(f"README python block {i + 1} failed: {e!r}\n{block}") from e
    # The quickstart's figures: norm sqrt(6 * 16 + 2) of the example gradients, clipped to 1.
    s = gradclip_jax.host_stats(namespace["opt_state"])
    assert s["grad_norm"] == pytest.approx(np.sqrt(98.0)) and s["threshold"] == 1.0
    assert "grad_norm" in capsys.readouterr().out  # log_stats(..., print) printed them


def test_docs_api_page_names_every_public_name():
    api = (pathlib.Path(__file__).parents[1] / "docs" / "api.md").read_text()
    for name in gradclip_jax.__all__:
        assert f"gradclip_jax.{name}\n" in api, f"{name} is missing from docs/api.md"
