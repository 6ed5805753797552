"""Dataset sources, selected by a spec string such as `digits` or `npz:PATH`.

Importing this package registers every built-in source.
"""

from galkeras.datasets import (  # noqa: F401  (they register)
    animal10n,
    cifar,
    clothing1m,
    digits,
    folder,
    npz,
)
from galkeras.datasets.base import (
    Dataset,
    DatasetError,
    check_dataset_spec,
    dataset_names,
    load_dataset,
    register,
)

__all__ = [
    "Dataset",
    "DatasetError",
    "check_dataset_spec",
    "dataset_names",
    "load_dataset",
    "register",
]
