"""The dataset presets: one entry per dataset the paper trains on (plus scikit-learn's digits), read everywhere.

A preset says where a dataset lives on the Hub and how it is laid out (columns, test split), how hf_aace prepares it
(channels, size, padding, fixed statistics, the paper's augmentation) and what converting the paper's checkpoints
needs (class names in the paper's label order, the statistics its code normalises with). Loading, augmentation, the
scripts' help text and conversion all read this table; adding a dataset is one entry in `PRESETS`.

This module imports nothing heavier than the standard library, so conversion and argument parsing do not pull in the
data pipeline.
"""

from dataclasses import dataclass, field, fields

DIGITS_ID = "sklearn.datasets.load_digits"


@dataclass(frozen=True)
class AugmentationSettings:
    """The training augmentation of a dataset, in pixels (the arguments of [`BatchAugmentation`]).

    Attributes:
        crop_padding: zero padding of the random crop (a crop of the input's size); None or 0: no crop.
        flip: mirror each image horizontally with probability 0.5.
        cutout_size: side of the Cutout square; None or 0: no Cutout.
        cutout_p: probability that an image gets a Cutout square.
    """

    crop_padding: int | None = None
    flip: bool = False
    cutout_size: int | None = None
    cutout_p: float = 0.5

    def as_kwargs(self) -> dict[str, int | bool | float | None]:
        """The settings as keyword arguments of [`BatchAugmentation`]."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def scaled_to(cls, size: tuple[int, int]) -> "AugmentationSettings":
        """The CIFAR recipe (padding 4, flip, Cutout 16 at 32 px, p = 0.5) scaled to an image's shorter side."""
        side = min(size)
        return cls(crop_padding=max(1, round(side / 8)), flip=True, cutout_size=max(1, side // 2))


@dataclass(frozen=True)
class DatasetPreset:
    """How one dataset is laid out on the Hub, prepared for training, and converted from the paper's checkpoints.

    Attributes:
        name: the preset's key (`--dataset` value).
        hub_id: the dataset's Hub id (scikit-learn's loader for `digits`).
        image_column: the image column.
        label_column: the label column.
        test_split: the split used for evaluation.
        num_channels: 1 (grayscale) or 3 (RGB).
        image_size: `(height, width)` the images are prepared at.
        augmentation: the paper's training augmentation for this dataset.
        pad_to_square: whether images are zero-padded to a centred square before resizing.
        mean: fixed per-channel normalisation mean; None: computed from the training split.
        std: fixed per-channel normalisation std; None: computed from the training split.
        coarse_label_column: the superclass column (`--coarse_labels`), if the dataset has one.
        label_names: class names in label-index order, as the paper's code numbers them; empty when the paper does not
            use the dataset.
        reference_mean: the normalisation mean of the paper's code (what a converted checkpoint expects).
        reference_std: the matching std.
        normalization_source: where `reference_mean`/`reference_std` come from, for the conversion card.
        aliases: other spellings accepted for `name` (the paper's own among them).
    """

    name: str
    hub_id: str
    image_column: str
    label_column: str
    test_split: str
    num_channels: int
    image_size: tuple[int, int]
    augmentation: AugmentationSettings
    pad_to_square: bool = False
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    coarse_label_column: str | None = None
    label_names: tuple[str, ...] = ()
    reference_mean: tuple[float, ...] | None = None
    reference_std: tuple[float, ...] | None = None
    normalization_source: str = ""
    aliases: tuple[str, ...] = field(default=())

    @property
    def convertible(self) -> bool:
        """Whether the paper's code trains on this dataset, so its checkpoints can be converted."""
        return bool(self.label_names) and self.reference_mean is not None


_TRAINING_SET_STATS = (
    "the widely used per-channel mean and std over all training-set pixels, the statistics that the paper's code "
    "computes from the training set at run time"
)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_CIFAR_AUGMENTATION = AugmentationSettings(crop_padding=4, flip=True, cutout_size=16)

_CIFAR10_LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# CIFAR-100 fine labels, in the dataset's (alphabetical) index order.
_CIFAR100_LABELS = tuple(
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel "
    "can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur "
    "dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion "
    "lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree "
    "pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea "
    "seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank "
    "telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm".split()
)

_FASHION_MNIST_LABELS = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

# The paper's code trains on torchvision's Food101, which numbers the classes in Python's sorted() order
# ("cheese_plate" before "cheesecake"); the display tuple in its data module swaps those two.
_FOOD101_LABELS = tuple(
    sorted(
        "apple_pie baby_back_ribs baklava beef_carpaccio beef_tartare beet_salad beignets bibimbap bread_pudding "
        "breakfast_burrito bruschetta caesar_salad cannoli caprese_salad carrot_cake ceviche cheese_plate "
        "cheesecake chicken_curry chicken_quesadilla chicken_wings chocolate_cake chocolate_mousse churros "
        "clam_chowder club_sandwich crab_cakes creme_brulee croque_madame cup_cakes deviled_eggs donuts dumplings "
        "edamame eggs_benedict escargots falafel filet_mignon fish_and_chips foie_gras french_fries "
        "french_onion_soup french_toast fried_calamari fried_rice frozen_yogurt garlic_bread gnocchi greek_salad "
        "grilled_cheese_sandwich grilled_salmon guacamole gyoza hamburger hot_and_sour_soup hot_dog "
        "huevos_rancheros hummus ice_cream lasagna lobster_bisque lobster_roll_sandwich macaroni_and_cheese "
        "macarons miso_soup mussels nachos omelette onion_rings oysters pad_thai paella pancakes panna_cotta "
        "peking_duck pho pizza pork_chop poutine prime_rib pulled_pork_sandwich ramen ravioli red_velvet_cake "
        "risotto samosa sashimi scallops seaweed_salad shrimp_and_grits spaghetti_bolognese spaghetti_carbonara "
        "spring_rolls steak strawberry_shortcake sushi tacos takoyaki tiramisu tuna_tartare waffles".split()
    )
)

PRESETS: dict[str, DatasetPreset] = {
    preset.name: preset
    for preset in (
        DatasetPreset(
            name="cifar10",
            hub_id="uoft-cs/cifar10",
            image_column="img",
            label_column="label",
            test_split="test",
            num_channels=3,
            image_size=(32, 32),
            augmentation=_CIFAR_AUGMENTATION,
            label_names=_CIFAR10_LABELS,
            reference_mean=(0.4914, 0.4822, 0.4465),
            reference_std=(0.2470, 0.2435, 0.2616),
            normalization_source=_TRAINING_SET_STATS,
        ),
        DatasetPreset(
            name="cifar100",
            hub_id="uoft-cs/cifar100",
            image_column="img",
            label_column="fine_label",
            test_split="test",
            num_channels=3,
            image_size=(32, 32),
            augmentation=_CIFAR_AUGMENTATION,
            coarse_label_column="coarse_label",
            label_names=_CIFAR100_LABELS,
            reference_mean=(0.5071, 0.4865, 0.4409),
            reference_std=(0.2673, 0.2564, 0.2762),
            normalization_source=_TRAINING_SET_STATS,
        ),
        DatasetPreset(
            name="fashion_mnist",
            hub_id="zalando-datasets/fashion_mnist",
            image_column="image",
            label_column="label",
            test_split="test",
            num_channels=1,
            image_size=(28, 28),
            augmentation=AugmentationSettings(cutout_size=16),
            label_names=_FASHION_MNIST_LABELS,
            reference_mean=(0.2860,),
            reference_std=(0.3530,),
            normalization_source=_TRAINING_SET_STATS,
            aliases=("fashionmnist", "fashion-mnist"),  # the paper's code spells it "fashionmnist"
        ),
        DatasetPreset(
            name="food101",
            hub_id="ethz/food101",
            image_column="image",
            label_column="label",
            test_split="validation",
            num_channels=3,
            image_size=(32, 32),
            augmentation=AugmentationSettings(flip=True, cutout_size=16),
            pad_to_square=True,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            label_names=_FOOD101_LABELS,
            reference_mean=IMAGENET_MEAN,
            reference_std=IMAGENET_STD,
            normalization_source="the ImageNet mean and std, as in the paper's code",
        ),
        DatasetPreset(
            name="digits",
            hub_id=DIGITS_ID,
            image_column="image",
            label_column="label",
            test_split="test",
            num_channels=1,
            image_size=(8, 8),
            augmentation=AugmentationSettings(crop_padding=1, cutout_size=4),
        ),
    )
}

_ALIASES = {alias: preset.name for preset in PRESETS.values() for alias in (preset.name, *preset.aliases)}


def get_preset(name: str) -> DatasetPreset | None:
    """The preset called `name` or one of its aliases (case-insensitive), or None when `name` is not a preset."""
    return PRESETS.get(_ALIASES.get(name.strip().lower())) if isinstance(name, str) else None


def preset_names(convertible: bool = False) -> list[str]:
    """The presets' names (only those whose paper checkpoints convert, with `convertible=True`)."""
    return [name for name, preset in PRESETS.items() if preset.convertible or not convertible]


__all__ = ["DIGITS_ID", "PRESETS", "AugmentationSettings", "DatasetPreset", "get_preset", "preset_names"]
