"""Writes small image-classification datasets in the Hugging Face Hub's layout (parquet shards + README.md)."""

import io

import datasets
import numpy as np
import PIL.Image
import yaml


def encode(image, image_format="PNG"):
    """PNG (or other format) bytes of a PIL image or uint8 array, as the Image feature stores them."""
    image = image if isinstance(image, PIL.Image.Image) else PIL.Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return {"bytes": buffer.getvalue(), "path": None}


def write_hub_dataset(root, features, splits, parquet_features=None):
    """Writes `splits` ({split: {column: values}}) in the Hub layout: parquet shards plus a README declaring features.

    `parquet_features` lets the parquet files carry other features than the README (to simulate inconsistent data).
    """
    data_files = []
    for split, columns in splits.items():
        shard = root / "plain_text" / f"{split}-00000-of-00001.parquet"
        shard.parent.mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_dict(columns, features=parquet_features or features).to_parquet(str(shard))
        data_files.append({"split": split, "path": f"plain_text/{split}-*"})
    card = {
        "dataset_info": {"config_name": "plain_text", "features": features._to_yaml_list()},
        "configs": [{"config_name": "plain_text", "data_files": data_files, "default": True}],
    }
    (root / "README.md").write_text(f"---\n{yaml.safe_dump(card)}---\n")
    return root


def write_integer_label_dataset(directory, train_labels, test_labels=(0, 1)) -> str:
    """A dataset of random 4x4 grayscale images whose "label" column holds plain integers (no ClassLabel names).

    It is written to a folder of `directory` named after the largest labels, and its path is returned.
    """
    rng = np.random.default_rng(1)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    splits = {
        split: {
            "image": [encode(rng.integers(0, 256, (4, 4), dtype=np.uint8)) for _ in labels],
            "label": list(labels),
        }
        for split, labels in (("train", train_labels), ("test", test_labels))
    }
    return str(write_hub_dataset(directory / f"labels-{max(train_labels)}-{max(test_labels)}", features, splits))
