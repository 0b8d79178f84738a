"""Plugins that ship with cq-core, registered through the same hooks as any other."""
