"""One voice across the scripts: the small helpers each script repeats (docs/contributing.md) must not drift
apart, and every script speaks through them."""
import ast
import re

import pytest

from conftest import REPO

SCRIPTS = ["quest_12_2.py", "quest_13_2.py", "quest_14_1.py", "quest_7_2.py"]
SHARED_HELPERS = ["fail", "OneLineParser", "positive_int", "positive_float", "pick_device", "check_output_dir",
                  "write_atomically", "torch_bytes"]


def top_level_definitions(script):
    source = (REPO / script).read_text()
    if script.endswith(".md"):  # the reference copies: the python blocks of docs/contributing.md
        source = "\n".join(re.findall(r"```python\n(.*?)```", source, re.S))
    tree = ast.parse(source)
    return {node.name: ast.get_source_segment(source, node) for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


@pytest.mark.parametrize("helper", SHARED_HELPERS)
def test_a_repeated_helper_is_the_same_in_every_script(helper):
    copies = {script: top_level_definitions(script).get(helper) for script in ["docs/contributing.md", *SCRIPTS]}
    present = {script: text for script, text in copies.items() if text is not None}
    assert "docs/contributing.md" in present and len(present) > 1, f"{helper}: no reference copy, or no script uses it"
    first_script, first = next(iter(present.items()))
    for script, text in present.items():
        assert text == first, f"{helper} in {script} differs from the one in {first_script}; copy one verbatim"


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_fails_in_one_voice(script):
    definitions = top_level_definitions(script)
    for helper in ("fail", "OneLineParser", "pick_device"):
        assert helper in definitions, f"{script} has no {helper}; copy it from docs/contributing.md"
    source = (REPO / script).read_text()
    assert "allow_nan=False" in source, f"{script} can print NaN into its JSON line"
