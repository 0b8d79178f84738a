"""cq plugin entry point of cq-int8. Registers nothing yet."""
