"""aae-dist: distributed training of Adversarial Autoencoders on Ray Train."""

__version__ = "0.1.0"
