"""The model interface: what the pipeline knows about any model (docs/models.md).

`family` (ModelFamily, Entry, Program), `axes` (logical axis names and scopes), `quant`
(int8 weights) and `errors` (UserError). It imports nothing of the project's other packages.
"""
