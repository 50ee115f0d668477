"""Serving bundles: parameters, StableHLO, SavedModel, executables, manifest, verify."""
