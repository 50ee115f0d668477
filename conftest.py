"""Suite-wide: the longest test files start first.

`make test` runs two pytest-xdist workers with `--dist loadfile` (a file's tests on one
worker, so its module fixtures are built once). Files are handed out in collection order,
so a long file collected late runs alone at the end while the other worker idles (the
2026-11-27 suite ended with about three minutes of one busy worker). Ordering the files
measured longest first (docs/performance.md, `--durations`) keeps both workers busy until
the short files at the end even out.
"""

LONGEST_FIRST = (   # 2026-11-28, second run: --durations (docs/performance.md, "The test suite")
    "tests/test_cli_build.py",            # the CLI in subprocesses
    "tests/test_export.py",               # the CPU bundle: build, every artifact kind, verify, a tampered copy
    "tests/test_sharded_equivalence.py",  # every valid plan run on 32 simulated devices
    "tests/test_tpu_bundle.py",           # 8- and 2-process serving
    "tests/test_analysis.py",             # base on every serving plan, compiled for tpu-v4-64
    "tests/test_model_families.py",       # gpt2-tiny and a user model: build, bundle, verify (8 processes)
    "tests/test_export_base.py",          # the base bundle
    "tests/test_parity.py",
    "tests/test_semiotic.py",
    "tests/test_train_step.py",
    "bench/test_runtime.py",
    "tests/test_layout.py",
    "bench/test_plans.py",
    "tests/test_build_jobs.py",
    "bench/test_compile.py",
    "tests/test_bundle_trust.py",
)


def pytest_collection_modifyitems(session, config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    position = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda item: (rank.get(item.nodeid.split("::", 1)[0], len(rank)), position[id(item)]))
