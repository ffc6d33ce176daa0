"""`lora-tune serve`: an OpenAI-compatible HTTP server over an AdapterPool (optional extra: FastAPI + uvicorn)."""
