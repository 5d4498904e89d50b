"""Converts a checkpoint of the AACE paper's reproduction code into a Hugging Face model folder (and Hub repo).

Example:
    python scripts/convert_reference_checkpoint.py --checkpoint wrn16_8_cifar10.pth --dataset cifar10 \
        --output_dir wrn-16-8-cifar10-aace --source_url https://example.org/wrn16_8_cifar10.pth

The folder holds the model (safetensors + config + modeling code, loadable with `trust_remote_code=True`), the
`AACEImageProcessor` with the paper's preprocessing for the dataset, and a README.md model card.
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import create_repo, upload_folder
from transformers import HfArgumentParser

from hf_aace.convert import convert_reference_checkpoint, reference_image_processor
from hf_aace.data.presets import preset_names
from hf_aace.hub import build_conversion_card
from hf_aace.models import ARCHITECTURES


@dataclass
class ConversionArguments:
    checkpoint: str = field(metadata={"help": "The .pth/.pt state dict written by the paper's code."})
    dataset: str = field(
        metadata={"help": f"Dataset it was trained on: {', '.join(preset_names(convertible=True))} (or an alias)."}
    )
    architecture: str | None = field(
        default=None,
        metadata={"help": f"{' or '.join(ARCHITECTURES)}; inferred from the keys when omitted."},
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "Where to write the model folder; defaults to outputs/<checkpoint>-hf."}
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Also upload the folder to the Hub."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repo id (user/name) for --push_to_hub."})
    source_url: str | None = field(
        default=None, metadata={"help": "Where the checkpoint comes from, for the model card (default: file name)."}
    )


def main() -> int:
    (args,) = HfArgumentParser(ConversionArguments).parse_args_into_dataclasses()
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id user/name.")
    checkpoint = Path(args.checkpoint)
    output_dir = Path(args.output_dir or Path("outputs") / f"{checkpoint.stem}-hf")

    model = convert_reference_checkpoint(checkpoint, args.dataset, args.architecture)
    processor = reference_image_processor(args.dataset)
    card = build_conversion_card(model, args.dataset, args.source_url or checkpoint.name, args.hub_model_id)

    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    card.save(output_dir / "README.md")
    print(f"Saved {type(model).__name__} ({model.num_parameters():,} parameters) to {output_dir}")

    if args.push_to_hub:
        try:
            create_repo(args.hub_model_id, exist_ok=True)
            upload_folder(
                repo_id=args.hub_model_id, folder_path=output_dir, commit_message="Add a converted AACE checkpoint"
            )
        except Exception as error:  # network, authentication and permission errors all end here
            print(
                f"Pushing to {args.hub_model_id} failed ({type(error).__name__}: {error}).\n"
                f"The converted files are kept in {output_dir}. Log in (`hf auth login`) or check the repo id, then "
                f"upload them with:\n  hf upload {args.hub_model_id} {output_dir} .",
                file=sys.stderr,
            )
            return 1
        print(f"Pushed to {args.hub_model_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
