"""The conda environment and pyproject name the same dependencies; README and CI agree."""

import re
from pathlib import Path

import tomllib
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
CONDA_NAMES = {"pytorch": "torch"}  # conda package name → PyPI name


def _pyproject_requirements() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    return {r.name.lower(): str(r.specifier) for r in reqs}


def _conda_requirements() -> tuple[dict[str, str], list[str], str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda, pip, python = {}, [], ""
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            pip += dep["pip"]
            continue
        req = Requirement(dep.replace(" ", ""))
        if req.name == "python":
            python = str(req.specifier)
        elif req.name != "pip":
            conda[CONDA_NAMES.get(req.name, req.name).lower()] = str(req.specifier)
    return conda, pip, python


def test_environment_yml_names_the_same_dependencies_as_pyproject():
    conda, pip, python = _conda_requirements()
    assert conda == _pyproject_requirements()
    assert pip == ["-e .[dev]"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert python == project["requires-python"]


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```(?:bash|sh)\n(.*?)```", readme, flags=re.DOTALL)
    test_command = next(c.strip() for c in commands if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci
    assert "pip install torch==2.13.0" in test_command
