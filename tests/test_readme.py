"""The README's Python example runs as written on the model the README fetches, and offline on the embedded one."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_example() -> str:
    return re.search(r"## Python API\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)


def test_readme_python_example_runs_on_the_embedded_model():
    """Offline: the example with the embedded toy GPT-2 (4 layers) in place of SmolLM2 and of its layer 23."""
    from attrpatch.model.loading import DEFAULT_MODEL

    code = _python_example()
    assert 'ap.fetch("smollm2")' in code and "layer=23" in code
    code = code.replace('ap.fetch("smollm2")', repr(str(DEFAULT_MODEL))).replace("layer=23", "layer=2")
    code = code.replace("ap.ScreenConfig(", "ap.ScreenConfig(progress=False, ")
    exec(compile(code, "README.md", "exec"), {})


@pytest.mark.real_model
def test_readme_python_example_runs_as_written_on_smollm2(capsys):
    """As written, on the model the README fetches: L23H3 scores and patches positive (it moves the answer)."""
    code = _python_example().replace("ap.ScreenConfig(", "ap.ScreenConfig(progress=False, ")
    exec(compile(code, "README.md", "exec"), {})
    score, effect = map(float, capsys.readouterr().out.split()[-2:])
    assert score > 0.5 and effect > 0.5
