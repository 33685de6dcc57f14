"""neogate: the gateway app, its edge, metering and live backend state."""
