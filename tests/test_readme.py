"""The Python examples of the README and the guide run as written and print what their comments say; their
commands write no tracked file; the README stays short and every figure of the results page names its command."""
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
GUIDE = (ROOT / "docs" / "guide.md").read_text()
RESULTS = (ROOT / "docs" / "results.md").read_text()
EXAMPLES = [example for text in (README, GUIDE) for example in re.findall(r"```python\n(.*?)```", text, flags=re.S)]
PRINT_LINE = re.compile(r"^\s*print\(.*\)\s*#\s*(?P<expected>.+)$")


def expected_prints(example: str) -> list[str]:
    """The comment after each print() call: what that call prints. A print() without one is an error."""
    expected = []
    for line in example.splitlines():
        if re.match(r"^\s*print\(", line):
            match = PRINT_LINE.match(line)
            assert match, f"README print() without its output as a comment: {line.strip()}"
            expected.append(match["expected"].strip())
    return expected


def test_readme_has_examples():
    assert len(EXAMPLES) >= 2 and all(expected_prints(example) for example in EXAMPLES)


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_prints_what_it_says(index):
    printed = []
    scope = {"print": lambda *values: printed.append(" ".join(str(value) for value in values))}
    exec(compile(EXAMPLES[index], f"README/guide example {index}", "exec"), scope)
    assert printed == expected_prints(EXAMPLES[index])


def _shell_commands() -> list[list[str]]:
    blocks = [block for text in (README, GUIDE) for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]
    commands = []
    for block in blocks:
        for command in re.split(r"&&|\n(?!\s)", block.replace("\\\n", " ")):
            if command.strip():
                commands.append(shlex.split(command))
    return commands


def test_readme_commands_do_not_overwrite_the_repository():
    """An example run by a reader must not change tracked files (the pictures the README shows among them)."""
    shown = ({f"docs/{name}" for name in re.findall(r"!\[[^\]]*\]\(([^)/]+)\)", GUIDE + RESULTS)}
             | set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README)) | set(re.findall(r"\]\((docs/[^)]+)\)", README)))
    written = [words[i + 1] for words in _shell_commands() for i, word in enumerate(words[:-1]) if word == "--output"]
    assert written, "the README's commands write no --output: the check below would be empty"
    for path in written:
        assert path not in shown and not path.startswith("docs/"), f"a README command overwrites {path}"


def test_readme_is_short_and_opens_with_the_two_commands():
    assert len(README.splitlines()) <= 150
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    assert "python -m biformer train --data digits" in blocks[0] and "python -m pytest" in blocks[1]
    assert README.index("## The package") < README.index("## Examples")  # the map near the top


def test_every_table_of_the_results_page_follows_its_command():
    """Each measured table is preceded, in its section, by the command that produces it."""
    for section in RESULTS.split("\n## ")[1:]:
        if "\n| " in section:
            assert re.search(r"(python|bash) ", section.split("\n| ")[0]), section.splitlines()[0]


def test_the_pictures_the_docs_show_exist():
    for text, folder in ((README, ROOT), (GUIDE, ROOT / "docs"), (RESULTS, ROOT / "docs")):
        for picture in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
            assert (folder / picture).is_file(), picture


# the guide's commands, in order, as a reader runs them after the README's main job; each run shortened to a few
# steps (the paths between them, which a reader copies, are what this checks)
SHORTER = [(r"--epochs \d+", "--iters 2"), (r"--warmup-epochs \d+", "--warmup-iters 1"), (r"\bepochs=\d+", "epochs=1 fraction=0.05")]
PLACEHOLDERS = re.compile(r"\b(FOLDER|COCO_DIR)\b|biformer_small_in1k\.pth")  # files a reader brings


def _guide_sequence() -> list[str]:
    main_job = next(line for line in re.findall(r"```bash\n(.*?)```", README, flags=re.S)[0].split("&&")
                    if "biformer train" in line)
    commands = [main_job.strip()]
    for block in re.findall(r"```bash\n(.*?)```", GUIDE, flags=re.S):
        commands += [line.strip() for line in block.replace("\\\n", " ").splitlines()
                     if line.strip() and not PLACEHOLDERS.search(line)]
    for pattern, replacement in SHORTER:
        commands = [re.sub(pattern, replacement, command) for command in commands]
    return commands


@pytest.mark.slow
def test_the_guides_commands_run_in_sequence(tmp_path):
    import os
    import subprocess
    import sys

    commands = _guide_sequence()
    assert sum("yolo export model=" in command for command in commands) == 1 and len(commands) >= 9
    environment = {key: value for key, value in os.environ.items() if key != "BIFORMER_CACHE"}  # the guide's paths
    for command in commands:
        assert command.startswith("python -m biformer "), command
        result = subprocess.run(["bash", "-c", f"{sys.executable} {command.removeprefix('python ')}"], cwd=tmp_path,
                                env=environment, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{command}\n{(result.stdout + result.stderr)[-3000:]}"
