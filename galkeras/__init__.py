"""galkeras: Gradient Agreement Learning (Yan et al., 2023) in Keras 3."""

__version__ = "0.1.0"
