"""cq plugin entry point of cq-models. Registers nothing yet."""
