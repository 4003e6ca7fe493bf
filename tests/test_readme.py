"""The README's Python snippets run, in order, in one namespace (so the README stays true), and
what they print is what the README says they print."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_snippets_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 4, "the README tour lost its snippets"
    namespace: dict = {}
    outputs = []
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md[python block {i}]", "exec"), namespace)
        except Exception as e:  # pragma: no cover - the message is the point
            raise AssertionError(f"README python block {i} failed: {e!r}\n{block}") from e
        outputs.append(capsys.readouterr().out)
    assert "False" not in "".join(outputs).split(), outputs

    # The checkify snippet promises an out-of-bounds error for t + 1 = 1000; `err.get()` is None
    # (and prints "None") when checkify found nothing.
    checked = [i for i, b in enumerate(blocks) if "jaxdiff.checked" in b]
    assert len(checked) == 1, "the README's checkify snippet is gone or duplicated"
    out = outputs[checked[0]]
    assert "None" not in out.split(), out
    assert re.search(r"out-of-bounds indexing .*index 1000 ", out), out
