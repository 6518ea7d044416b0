"""The three AAE networks and the priors their codes are matched to."""

from .networks import Codes, build_networks
from .priors import build_prior

__all__ = ["Codes", "build_networks", "build_prior"]
