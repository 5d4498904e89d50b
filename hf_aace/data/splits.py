"""Loading a dataset's splits and choosing the image and label columns, checked before anything is decoded."""

from __future__ import annotations

import re

import datasets

from .digits import digits_dataset_dict
from .presets import DIGITS_ID


def load_splits(
    location: str, revision: str | None, test_split: str | None
) -> tuple[datasets.Dataset, datasets.Dataset, str]:
    """Loads the training and evaluation splits of a dataset.

    Args:
        location: what `datasets.load_dataset` reads (a Hub id or a local directory), or scikit-learn's digits.
        revision: the Hub revision to load.
        test_split: the evaluation split; None: `test`, else `validation`.

    Returns:
        The training split, the evaluation split and the evaluation split's name.
    """
    splits = digits_dataset_dict() if location == DIGITS_ID else _load_dataset(location, revision)
    if not isinstance(splits, datasets.DatasetDict):
        raise ValueError(f"{location!r} loaded as {type(splits).__name__}; expected a dataset with named splits.")
    test_split = test_split or _find_test_split(splits, location)
    for split in ("train", test_split):
        if split not in splits:
            raise ValueError(f"{location!r} has no {split!r} split (splits: {sorted(splits)}).")
        if splits[split].num_rows == 0:
            raise ValueError(f"The {split!r} split of {location!r} is empty.")
    return splits["train"], splits[test_split], test_split


def _load_dataset(location: str, revision: str | None) -> datasets.DatasetDict:
    try:
        return datasets.load_dataset(location, revision=revision)
    except ValueError as error:
        # datasets reports an empty split without naming the dataset.
        empty = re.search(r'Instruction "([^"]+)" corresponds to no data', str(error))
        if empty is None:
            raise
        raise ValueError(
            f"The {empty.group(1)!r} split of {location!r} is empty: add its rows or remove the split from the "
            "dataset."
        ) from error


def _find_test_split(splits: datasets.DatasetDict, location: str) -> str:
    for split in ("test", "validation"):
        if split in splits:
            return split
    raise ValueError(
        f"{location!r} has no 'test' or 'validation' split (splits: {sorted(splits)}); create one, e.g. with "
        "`dataset['train'].train_test_split(...)` saved in the Hub layout, and load that directory."
    )


def select_columns(
    train: datasets.Dataset,
    test: datasets.Dataset,
    test_split: str,
    location: str,
    columns: tuple[str | None, str | None],
    is_preset: bool,
) -> tuple[str, str]:
    """Picks the image and label columns and checks that the evaluation split has them too.

    Args:
        train: the training split.
        test: the evaluation split.
        test_split: the evaluation split's name.
        location: the loaded Hub id or directory, for error messages.
        columns: the requested image and label columns; None: the single `Image` / `ClassLabel` column.
        is_preset: whether the columns are a preset's (whose error suggests loading the data as a plain dataset).

    Returns:
        The image and label columns.
    """
    image_column, label_column = _find_columns(train.features, *columns, is_preset)
    if test.features.get(image_column) != train.features[image_column] or label_column not in test.features:
        raise ValueError(
            f"The {test_split!r} split of {location!r} lacks the columns {image_column!r} / {label_column!r} of the "
            f"train split (its columns: {list(test.features)})."
        )
    return image_column, label_column


def _find_columns(
    features: datasets.Features, image_column: str | None, label_column: str | None, is_preset: bool
) -> tuple[str, str]:
    """Picks the image and label columns, checking their feature types."""
    columns = {name: type(feature).__name__ for name, feature in features.items()}
    candidates = {
        "image_column": [name for name, feature in features.items() if isinstance(feature, datasets.Image)],
        "label_column": [name for name, feature in features.items() if isinstance(feature, datasets.ClassLabel)],
    }
    chosen = {"image_column": image_column, "label_column": label_column}
    for argument, column in chosen.items():
        kind = "Image" if argument == "image_column" else "ClassLabel"
        if column is not None:
            if column not in features:
                fix = (
                    "the preset expects its Hub layout; pass the directory or id as `name` instead to detect columns"
                    if is_preset
                    else f"pass {argument}= one of them"
                )
                raise ValueError(f"Column {column!r} not found; the columns are {columns}: {fix}.")
            continue
        found = candidates[argument]
        if len(found) != 1:
            problem = "no" if not found else f"{len(found)} ({found})"
            raise ValueError(
                f"Found {problem} {kind} columns, so the {argument.split('_')[0]} column is ambiguous; the columns "
                f"are {columns}: pass {argument}= naming the one to use."
            )
        chosen[argument] = found[0]
    image_column, label_column = chosen["image_column"], chosen["label_column"]
    if not isinstance(features[image_column], datasets.Image):
        raise ValueError(
            f"Column {image_column!r} is {features[image_column]!r}, not an Image column; columns: {columns}."
        )
    label = features[label_column]
    if not (
        isinstance(label, datasets.ClassLabel)
        or (isinstance(label, datasets.Value) and label.dtype.startswith(("int", "uint")))
    ):
        raise ValueError(
            f"Column {label_column!r} is {label!r}; labels must be a ClassLabel or integer column. Columns: {columns}."
        )
    return image_column, label_column
