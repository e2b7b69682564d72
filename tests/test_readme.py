"""The README's recipes run as written (all ```python blocks, in order, one namespace)."""

import re
from pathlib import Path

from builders import require_hooked_transformer, require_sae_lens

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_recipes_run(capsys):
    require_hooked_transformer()  # the recipes use a HookedTransformer and SAELens
    require_sae_lens()
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 5
    ns: dict = {}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md[python block {i}]", "exec"), ns)  # noqa: S102
        except Exception as e:  # pragma: no cover - message for the failing block
            raise AssertionError(f"README python block {i} failed: {e!r}\n{block}") from e
