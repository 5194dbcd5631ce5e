"""fedame."""
