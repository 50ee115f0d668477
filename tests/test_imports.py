"""The house: the analysis reads what the build writes and never imports the build driver,
the export or the semiotic module (docs/design.md, "The house")."""

import subprocess
import sys


def test_the_analysis_imports_flow_one_way():
    code = ("import sys\n"
            "import capibara_export.analysis.analyze, capibara_export.analysis.derive\n"
            "import capibara_export.analysis.plan_search, capibara_export.analysis.report\n"
            "print(sorted(m for m in sys.modules if m.startswith(('capibara_export.export', "
            "'capibara_export.semiotic', 'capibara_export.matrix.driver', 'capibara_export.matrix.compile', "
            "'capibara_export.cli'))))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", result.stdout
