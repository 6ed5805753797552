"""Noisy-label training methods: GAL's peers and their shared parts.

Each method is one `keras.Model` subclass over `NoisyLabelMethod`:

- `CE`: one network, plain cross entropy;
- `CoTeaching` (Han et al., 2018), `CoTeachingPlus` (Yu et al., 2019) and
  `JoCoR` (Wei et al., 2020): two networks and a small-loss selection, over
  `SmallLossMethod` (the forget-rate schedule).

GAL itself is `galkeras.GAL`. `BY_NAME` maps each peer's `--method` name to its
class: a new method is one new module here and one line there (plus, for new
hyperparameters, their flags in `galkeras.train`).
"""

from galkeras.methods.base import NoisyLabelMethod, SmallLossMethod
from galkeras.methods.ce import CE
from galkeras.methods.coteaching import CoTeaching
from galkeras.methods.coteaching_plus import CoTeachingPlus
from galkeras.methods.jocor import JoCoR

# The peers by their `--method` name.
BY_NAME = {
    "ce": CE,
    "coteaching": CoTeaching,
    "coteaching_plus": CoTeachingPlus,
    "jocor": JoCoR,
}

__all__ = [
    "BY_NAME",
    "CE",
    "CoTeaching",
    "CoTeachingPlus",
    "JoCoR",
    "NoisyLabelMethod",
    "SmallLossMethod",
]
