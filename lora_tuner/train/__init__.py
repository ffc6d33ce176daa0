"""Training: a trainer driven by a recipe, writing a complete run folder (train.run.run)."""
