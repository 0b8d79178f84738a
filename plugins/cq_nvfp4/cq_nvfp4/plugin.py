"""cq plugin entry point of cq-nvfp4. Registers nothing yet."""
