"""pyproject.toml: `pip install .` builds, its console commands run, and it asks for the same
dependencies as requirements.txt (the README's install)."""
import importlib
import os
import subprocess
import sys
import tomllib

import pytest

from trainer_fixtures import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def runtime_requirements():
    """requirements.txt's lines before its test section."""
    lines = (ROOT / "requirements.txt").read_text().split("# tests")[0].splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_the_package_needs_what_requirements_txt_installs():
    assert PYPROJECT["dependencies"] == runtime_requirements()
    assert PYPROJECT["optional-dependencies"]["demo-tools"] == ["music21==10.5.1"]


def test_every_console_command_names_a_function_of_the_package():
    for name, target in PYPROJECT["scripts"].items():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), name


def test_pip_install_builds_the_package_and_its_commands_run(tmp_path):
    """A real `pip install` of the checkout (offline: no build isolation, so setuptools must be there)."""
    pytest.importorskip("setuptools")
    target = tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                            "--quiet", "--target", str(target), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    env = dict(os.environ, PYTHONPATH=str(target))
    for name in PYPROJECT["scripts"]:
        script = target / "bin" / name
        assert script.is_file(), name
        result = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0 and "usage:" in result.stdout, (name, result.stderr[-2000:])
    merge_help = subprocess.run([sys.executable, str(target / "bin" / "clamp3-merge"), "--help"], cwd=tmp_path,
                                env=env, capture_output=True, text=True, timeout=120).stdout
    assert "--adapter" in merge_help and "--overwrite" in merge_help
