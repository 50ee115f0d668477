"""The analysis of a build: HLO parsing, collectives, the roofline, hotspots, the plan search,
selection and the report, all derived from the records and HLO a build folder holds.

It reads the build's records and folder (`capibara_export.matrix.records`, `.folder`,
`.cache`) and never imports the build driver, `export` or `semiotic`.
"""
