"""The documentation site builds with warnings as errors (`make docs`): a docstring that does not
render, a renamed or removed symbol the reference names, or a broken page fails here."""

import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"
COMMANDS = ("build", "plans", "report", "export", "verify", "serve", "server", "launch", "inspect", "keygen",
            "analyze", "bench-report")


def sphinx(source: Path, out: Path, *conf: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sphinx", "-b", "html", "-W", "--keep-going", "-q", *conf,
                           str(source), str(out)], capture_output=True, text=True, timeout=300)


def test_the_site_builds_with_warnings_as_errors_and_documents_the_api(tmp_path):
    result = sphinx(DOCS, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    semiotic = (tmp_path / "api" / "semiotic.html").read_text()
    for member in ("MnemosyneSemioModule.from_bundle", "MnemosyneSemioModule.interpret",
                   "MnemosyneSemioModule.analyze_culture", "SemioticInteraction", "ImagePipeline"):
        assert f'id="capibara_export.semiotic.{member}' in semiotic, member
    cli = (tmp_path / "api" / "cli.html").read_text()
    assert [c for c in COMMANDS if f"<h3>{c}<" not in cli] == [], "a command is missing from the reference"
    assert "--max-queue-delay-ms" in cli and "--trust-key" in cli
    assert (tmp_path / "performance.html").is_file() and (tmp_path / "api" / "server.html").is_file()


def test_a_symbol_the_reference_names_but_the_code_lacks_fails_the_build(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "index.rst").write_text("Broken\n======\n\n.. autoclass:: capibara_export.semiotic.NoSuchModule\n")
    result = sphinx(source, tmp_path / "out", "-c", str(DOCS))
    assert result.returncode != 0
    assert "NoSuchModule" in result.stderr
