"""The typer app ``cq`` and its rendering; nothing here is needed by the Python API."""
