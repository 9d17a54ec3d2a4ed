"""Source types: one module per type, each a plugin behind ``kvc.sources.base.Source``."""
