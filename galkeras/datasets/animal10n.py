"""`animal10n`: Animal-10N (paper Table 2), as a TFDS builder over the manual dir.

Animal-10N (Song et al., ICML 2019) has 50,000 training and 5,000 test 64×64
images of 10 confusable animals, with about 8% real label noise. Its KAIST
release is downloaded by hand; this builder reads it from the TFDS manual
directory and prepares a TFDS dataset once.
"""

from galkeras.datasets.base import (
    Dataset,
    StandIn,
    prepare_manual_builder,
    register,
    tfds_split_arrays,
)

CLASSES = (
    "cat",
    "lynx",
    "wolf",
    "coyote",
    "cheetah",
    "jaguar",
    "chimpanzee",
    "orangutan",
    "hamster",
    "guinea pig",
)

INSTRUCTIONS = """\
Animal-10N is downloaded by hand from KAIST: https://dm.kaist.ac.kr/datasets/animal-10n/
Unpack it so that the TFDS manual directory (<data_dir>/downloads/manual/, set
--data_dir) holds
    training/<label>_<index>.jpg   (50,000 64x64 JPEGs)
    testing/<label>_<index>.jpg    (5,000 64x64 JPEGs)
where <label> is the class id 0-9 in the order: cat, lynx, wolf, coyote, cheetah,
jaguar, chimpanzee, orangutan, hamster, guinea pig. The binary release works too:
    data_batch_*.bin, test_batch.bin   (records of a 4-byte id, a 4-byte label,
                                        then a 3x64x64 depth-major image)"""


@register("animal10n", stand_in=StandIn((64, 64, 3), 10, "crop_flip"))
def load_animal10n(arg, data_dir, **options):
    """Prepares (once) and loads Animal-10N; ~8% real noise, clean labels unknown."""
    from galkeras.datasets.animal10n_builder import Animal10n

    builder = Animal10n(data_dir=data_dir)
    prepare_manual_builder(builder, "animal10n", INSTRUCTIONS, data_dir)
    train, test = (
        tfds_split_arrays(builder.as_dataset(split=s)) for s in ("train", "test")
    )
    return Dataset(
        name="animal10n",
        x_train=train["image"],
        y_train=train["label"],
        x_test=test["image"],
        y_test=test["label"],
        num_classes=len(CLASSES),
        class_names=CLASSES,
        augmentation="crop_flip",
    )
