"""Data: read rows (reading), the formats and their prompt templates (formats, templates), token ids exactly as
inference sees them (tokenize), checked train/validation rows (prepare)."""
