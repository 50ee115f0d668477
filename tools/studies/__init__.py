"""One-off studies: each module's docstring says the question it answered and where the
answer is written. Not collected by `pytest bench/` (bench/ holds what the benchmark suite
runs); run one with `python -m tools.studies.NAME` from the repository root."""
