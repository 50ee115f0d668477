"""No file of the source tree sits where the common Python `.gitignore` would drop it.

A package named `build/` (as the compile matrix once was) vanishes from version control,
without a warning, for a contributor who adds GitHub's Python template; structure tools skip
such folders as output. The template's patterns are in tests/data/Python.gitignore."""

import subprocess
from pathlib import Path

import pathspec

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = Path(__file__).parent / "data" / "Python.gitignore"


def tracked_files() -> list[str]:
    result = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"the tree is checked through git: {result.stderr}"
    return [line for line in result.stdout.splitlines() if line]


def test_no_tracked_file_is_one_the_python_gitignore_template_ignores():
    spec = pathspec.GitIgnoreSpec.from_lines(TEMPLATE.read_text().splitlines())
    files = tracked_files()
    assert "capibara_export/matrix/driver.py" in files    # the listing is the tree, not an empty answer
    assert spec.match_file("capibara_export/build/driver.py")   # and the template is the one that bit us
    assert [f for f in files if spec.match_file(f)] == []


def test_no_folder_is_named_like_build_output():
    folders = {part for f in tracked_files() for part in Path(f).parts[:-1]}
    assert not folders & {"build", "dist", "lib", "lib64", "target", "var", "parts", "wheels", "sdist", "eggs"}
