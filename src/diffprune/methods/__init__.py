"""Training methods, one plug-in per file, registered by name (see `base.py`)."""
from .base import METHODS, Method, MethodConfig, ParamGroup, PhaseSpec, get_method, make_config, register

__all__ = ["METHODS", "Method", "MethodConfig", "ParamGroup", "PhaseSpec", "get_method", "make_config", "register"]
