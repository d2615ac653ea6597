"""mta: a store-and-forward mail transfer agent."""

__version__ = "0.1.0"
