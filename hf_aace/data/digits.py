"""scikit-learn's bundled 8x8 digits as a Hub-style dataset: the `digits` preset, which needs no network."""

from __future__ import annotations

import io

import datasets
import numpy as np
import PIL.Image


def digits_dataset_dict() -> datasets.DatasetDict:
    """scikit-learn's 8x8 digits as a DatasetDict with PNG `Image` and `ClassLabel` ("0".."9") columns.

    `sklearn.datasets.load_digits()` holds 1,797 images with values 0..16; they are scaled to uint8 as
    `(v * 255 + 8) // 16` (0 -> 0, 16 -> 255, rounding halves up). The split is stratified and fixed:
    `sklearn.model_selection.train_test_split(indices, test_size=0.2, stratify=target, random_state=0)`, each part
    kept in the original order (1,437 train, 360 test).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = ((digits.images.astype(np.int64) * 255 + 8) // 16).astype(np.uint8)
    train_index, test_index = train_test_split(
        np.arange(len(pixels)), test_size=0.2, stratify=digits.target, random_state=0
    )
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])}
    )
    splits = {}
    for split, index in (("train", np.sort(train_index)), ("test", np.sort(test_index))):
        encoded = []
        for i in index:
            buffer = io.BytesIO()
            PIL.Image.fromarray(pixels[i]).save(buffer, format="PNG")
            encoded.append({"bytes": buffer.getvalue(), "path": None})
        splits[split] = datasets.Dataset.from_dict(
            {"image": encoded, "label": digits.target[index].tolist()}, features=features, split=split
        )
    return datasets.DatasetDict(splits)
