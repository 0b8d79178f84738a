"""The commands behind the CLI and the Python API: convert, calibrate, verify, inspect, migrate, meta, demo."""
