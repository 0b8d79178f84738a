"""An example third-party cq preset package (see plugin.py)."""
