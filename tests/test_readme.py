"""The README cannot drift from the code: its test command is the one CI and the GPU workflow run, and every
quest command in its code blocks (and in docs/) parses with the script's own argument parser."""
import re
import shlex

import pytest

from conftest import REPO, import_script

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("quest_*.md"))]


def code_lines(path):
    """Lines inside ``` fenced blocks, with `\\` continuations joined and comments dropped."""
    lines, inside, pending = [], False, ""
    for raw in path.read_text().splitlines():
        if raw.strip().startswith("```"):
            inside = not inside
            continue
        if not inside:
            continue
        line = pending + raw.split(" #")[0].rstrip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if line.strip():
            lines.append(line.strip())
    return lines


def quest_commands():
    for path in DOCS:
        for line in code_lines(path):
            for part in re.split(r"&&|;|\|", line):
                words = shlex.split(part)
                scripts = [i for i, word in enumerate(words) if re.fullmatch(r"(\./)?quest_\d+_\d+\.py", word)]
                if scripts:
                    yield pytest.param(words[scripts[0]].lstrip("./"), words[scripts[0] + 1:],
                                       id=f"{path.name}: {part.strip()[:80]}")


def test_the_readme_test_command_is_what_ci_and_the_gpu_workflow_run():
    commands = [line for line in code_lines(REPO / "README.md") if "pytest" in line]
    assert len(commands) == 1, f"the README should give one test command, found {commands}"
    test_command = commands[0].split("&&")[-1].strip()
    assert test_command in (REPO / ".ci" / "run").read_text()
    assert test_command in (REPO / ".github" / "workflows" / "gpu-smoke.yml").read_text()


def test_the_readme_shows_a_command_for_every_quest():
    scripts = {script for script, *_ in (param.values for param in quest_commands())}
    assert scripts >= {"quest_12_2.py", "quest_13_2.py", "quest_14_1.py", "quest_7_2.py"}, scripts


@pytest.mark.parametrize("script, args", list(quest_commands()))
def test_every_documented_command_parses(script, args, tmp_path, monkeypatch):
    if "--help" in args or "-h" in args:
        return
    monkeypatch.chdir(tmp_path)
    for arg in args:  # a settings file the docs' example reads: an empty one, so the flags are what is checked
        if arg.endswith(".json") and "/" not in arg:
            (tmp_path / arg).write_text("{}")
    module = import_script(script)
    try:
        module.parse_args(args)
    except SystemExit as exit_info:
        pytest.fail(f"{script} {' '.join(args)}: {exit_info}")
