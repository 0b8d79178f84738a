"""cq-models: a cq plugin (being filled in; registers nothing yet)."""
