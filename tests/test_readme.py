"""The README's Python example runs as written, on a model saved to and loaded from a local folder."""

import json
import re
from pathlib import Path

from conftest import random_pairs, tiny_model

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    code = re.search(r"## Python API\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    folder = tmp_path / "model"
    tiny_model("gpt2").save_pretrained(folder)
    (tmp_path / "pairs.jsonl").write_text("".join(
        json.dumps({"clean_ids": p.clean_ids, "corrupt_ids": p.corrupt_ids, "answer_id": p.answer_id,
                    "wrong_id": p.wrong_id}) + "\n" for p in random_pairs(n=3)))
    monkeypatch.chdir(tmp_path)
    code = code.replace("path/to/local/folder", str(folder))
    code = code.replace("ap.ScreenConfig(", "ap.ScreenConfig(progress=False, ")
    exec(compile(code, "README.md", "exec"), {})
