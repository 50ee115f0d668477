"""capibara-export: compile, analyse, select and export the semiotic model for TPU slices."""

__version__ = "0.1.0"
