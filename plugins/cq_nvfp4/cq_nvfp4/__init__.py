"""cq-nvfp4: a cq plugin (being filled in; registers nothing yet)."""
