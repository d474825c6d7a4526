"""The `icd` command line: one module per command (or group), the shared options and the console."""
