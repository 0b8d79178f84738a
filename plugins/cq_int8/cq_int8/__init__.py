"""cq-int8: a cq plugin (being filled in; registers nothing yet)."""
