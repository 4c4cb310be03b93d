"""The README's Python example runs as written (in a scratch folder)."""

import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _section_code(title: str) -> str:
    section = README.read_text().split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_python_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(_section_code("Python"), "README.md (Python)", "exec"), namespace)
    same, ghost = namespace["same"].eval(), namespace["ghost"].eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(same(x), ghost(x))  # the reloaded file is the model that was saved
