"""`lora-tune ui`: a local page to watch runs, compare them and talk to their adapters (app.py, runs.py, static/)."""
