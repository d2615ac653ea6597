"""The daemon's HTTP side (issue 15), on aiohttp and the daemon's own event loop."""
