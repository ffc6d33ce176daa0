"""Reading checkpoints: every read of a model's or an adapter's weights from disk goes through this package."""
