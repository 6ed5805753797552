"""galkeras: Gradient Agreement Learning (Yan et al., Applied Sciences 2023) in Keras 3."""

__version__ = "0.1.0"
