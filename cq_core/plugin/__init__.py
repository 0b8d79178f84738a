"""The plugin contract: the hookspecs, the types plugins implement, format contracts, key layouts, the plugin manager."""
