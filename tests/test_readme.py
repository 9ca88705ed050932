"""README.md's code must work: its Python examples run, and CI runs its test command."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)
SH_BLOCKS = re.findall(r"```sh\n(.*?)```", README, flags=re.S)


def test_readme_has_examples() -> None:
    assert len(PYTHON_BLOCKS) >= 2
    assert len(SH_BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_example_runs(index: int, capsys: pytest.CaptureFixture[str]) -> None:
    # Run as a real module: dataclasses look their module up in sys.modules.
    module = types.ModuleType(f"readme_example_{index}")
    sys.modules[module.__name__] = module
    try:
        code = compile(PYTHON_BLOCKS[index], f"README.md[python {index}]", "exec")
        exec(code, module.__dict__)
    finally:
        del sys.modules[module.__name__]
    if "global value" in PYTHON_BLOCKS[index]:
        out = capsys.readouterr().out
        assert "global value after 3 rounds" in out


def test_ci_runs_the_readme_test_command() -> None:
    test_command = SH_BLOCKS[1].strip()
    assert "pytest" in test_command
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_readme_main_command_uses_the_cli() -> None:
    assert SH_BLOCKS[0].strip().endswith("emberfl run")
