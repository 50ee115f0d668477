"""Scripts beside the package: studies that answered one question each (tools/studies/)."""
