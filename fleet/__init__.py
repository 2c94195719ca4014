"""Fleet learning on Flower (placeholder, filled below)."""
