"""The README's Python example runs as written, so the documentation cannot drift from the API."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_a_python_example():
    blocks = python_blocks()
    assert blocks and "fracfx.transform" in blocks[0]


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the example writes model.onnx into the working directory
    namespace: dict = {}
    exec(compile(python_blocks()[0], str(README), "exec"), namespace)
    assert (tmp_path / "model.onnx").stat().st_size > 0
    report = namespace["report"]
    assert report.verify is not None and report.verify.ok, "\n".join(report.lines())
    printed = capsys.readouterr().out
    assert "act_quant" in printed or "ActQuant" in printed or "quant" in printed  # print(qm.graph) shows the quantizer nodes


def test_readme_hugging_face_example_runs(capsys):
    import pytest

    pytest.importorskip("transformers", reason="the Hugging Face example needs the hf extra: pip install -e '.[hf]'")
    block = next(b for b in python_blocks() if "from transformers import" in b)
    exec(compile(block, str(README), "exec"), {})
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == "export" and "lm_head" in printed
