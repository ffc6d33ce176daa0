"""Planning: memory and time of a recipe on a device, from the model config alone (make_plan in .estimate).
Only the device table is imported here, so the CLI can offer its names without importing transformers."""
from .devices import DEVICE_NAMES, GPUS, Device, device

__all__ = ["DEVICE_NAMES", "GPUS", "Device", "device"]
