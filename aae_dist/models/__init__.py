"""The three AAE networks, the priors their codes are matched to, and the AAE that holds them."""

from .aae import AAE, output_likelihood
from .networks import Codes, build_networks
from .priors import build_prior

__all__ = ["AAE", "Codes", "build_networks", "build_prior", "output_likelihood"]
