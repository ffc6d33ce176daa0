"""Data: read rows, convert formats to prompt/completion examples, drop and report bad rows, split."""
from .prepare import PreparedData, prepare_data
from .templates import ALPACA, render

__all__ = ["ALPACA", "PreparedData", "prepare_data", "render"]
