"""The bundled recipes (package data): `lora-tune recipes` lists them, and every command takes their names."""
