"""Checkpoint layout conversions: scanned <-> unscanned layers, 2021 seed model -> DalleBart.

Example: ``flat = scan_params(convert_bart2021_params(flat))``.
"""

from .bart2021 import convert_bart2021_config, convert_bart2021_params, is_bart2021_config, is_bart2021_params
from .scan import is_scanned, scan_params, unscan_params

__all__ = [
    "convert_bart2021_config",
    "convert_bart2021_params",
    "is_bart2021_config",
    "is_bart2021_params",
    "is_scanned",
    "scan_params",
    "unscan_params",
]
