"""Every Python snippet of the README runs as it stands."""
import re
import runpy
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_snippets():
    assert len(SNIPPETS) >= 5


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_snippet_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # snippets may write files ("sigma.png", "out/")
    path = tmp_path / f"snippet_{index}.py"
    path.write_text(SNIPPETS[index])
    runpy.run_path(str(path), run_name="__main__")
