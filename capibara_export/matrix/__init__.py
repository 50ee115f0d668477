"""The build: targets and meshes, programs, compilation, the result cache, compile records,
the build folder and its staging, and the driver that runs the compile matrix.

Imports flow one way: the build may use `capibara_export.analysis` (the driver reads the
analysis of what it compiled to propose plans); the analysis reads what the build writes
(records, build folders) and never imports the driver, `export` or `semiotic`.
"""
