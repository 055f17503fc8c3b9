"""One voice across the scripts: the small helpers each script repeats (docs/contributing.md) must not drift
apart, every script speaks through them, and they stand where a learner expects plumbing: after the quest."""
import ast
import functools
import re

import pytest

from conftest import REPO

SCRIPTS = ["quest_12_2.py", "quest_13_2.py", "quest_14_1.py", "quest_7_2.py"]
MNIST_SCRIPTS = ["quest_12_2.py", "quest_13_2.py", "quest_14_1.py"]
# Every script has these; the helpers that can change results (data loading, the lr schedule) are shared too.
PLUMBING = ["fail", "OneLineParser", "number", "pick_device", "check_output_dir", "write_atomically", "all_finite",
            "exit_interrupted", "exit_closed_pipe"]
SHARED_HELPERS = [*PLUMBING, "raise_interrupt", "torch_bytes", "read_idx", "load_mnist", "warmup_cosine",
                  "utf8_path"]
SIGNALS_HELD = '''    if hasattr(signal, "pthread_sigmask"):  # held until the imports end: one landing inside numpy's C import breaks it
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})'''
START_GUARD = '''    if hasattr(signal, "pthread_sigmask"):  # a signal held meanwhile is raised here, inside this guard
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
except KeyboardInterrupt as stop:
    print("error: interrupted while starting; nothing was done", file=sys.stderr)
    sys.exit(128 + (stop.args[0] if stop.args else signal.SIGINT))'''


@functools.lru_cache(maxsize=None)  # parsed once per file, not once per helper: seconds saved
def top_level_definitions(script):
    """name -> (source text, first line) of each top-level function and class."""
    source = (REPO / script).read_text()
    if script.endswith(".md"):  # the reference copies: the python blocks of docs/contributing.md
        source = "\n".join(re.findall(r"```python\n(.*?)```", source, re.S))
    tree = ast.parse(source)
    return {node.name: (ast.get_source_segment(source, node), node.lineno) for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


@pytest.mark.parametrize("helper", SHARED_HELPERS)
def test_a_repeated_helper_is_the_same_in_every_script(helper):
    copies = {script: top_level_definitions(script).get(helper) for script in ["docs/contributing.md", *SCRIPTS]}
    present = {script: copy[0] for script, copy in copies.items() if copy is not None}
    assert "docs/contributing.md" in present and len(present) > 1, f"{helper}: no reference copy, or no script uses it"
    reference = present["docs/contributing.md"]
    for script, text in present.items():
        assert text == reference, f"{helper} in {script} differs from docs/contributing.md; copy it verbatim"


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_speaks_through_the_plumbing_placed_after_its_quest(script):
    definitions = top_level_definitions(script)
    for helper in PLUMBING:
        assert helper in definitions, f"{script} has no {helper}; copy it from docs/contributing.md"
        assert definitions[helper][1] > definitions["main"][1], f"{script}: {helper} stands before main; the quest first"
    source = (REPO / script).read_text()
    assert "allow_nan=False" in source, f"{script} can print NaN into its JSON line"
    main_block = source[source.index('if __name__ == "__main__":'):]
    assert "except BrokenPipeError:" in main_block and "exit_closed_pipe()" in main_block, \
        f"{script}: `| head` would end it in a traceback; catch BrokenPipeError as docs/contributing.md does"


@pytest.mark.parametrize("script", MNIST_SCRIPTS)
def test_the_mnist_scripts_read_their_data_the_same_way(script):
    assert "load_mnist" in top_level_definitions(script), f"{script} reads MNIST its own way; copy load_mnist"


@pytest.mark.parametrize("script", SCRIPTS)
def test_ctrl_c_or_sigterm_while_starting_ends_in_one_line(script):
    source = (REPO / script).read_text()
    guard = source.find("signal.signal(signal.SIGTERM, raise_interrupt)")
    assert guard != -1 and START_GUARD in source, f"{script} has no start guard; copy it from docs/contributing.md"
    held = source.find(SIGNALS_HELD)
    assert guard < held < source.find("import torch") < source.find(START_GUARD), f"{script}: torch loads outside the guard"
