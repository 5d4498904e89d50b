"""The model card's "How to use" snippet runs as written, for every task a card can name.

Each case builds a tiny random-init model, saves it with the processor its task reads (built offline), builds the
card with `repo_id` set to that folder, then executes the card's code block and checks that it loaded the model
with its head and that the pipeline (or the direct call) it shows works.
"""

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForMaskedLM,
    BertForMultipleChoice,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
    Wav2Vec2Config,
    Wav2Vec2CTCTokenizer,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2ForCTC,
    Wav2Vec2ForSequenceClassification,
    Wav2Vec2Processor,
)
from transformers.modelcard import TASK_MAPPING
from transformers.pipelines import SUPPORTED_TASKS, check_task

from hf_aace import AACEImageProcessor, WideResNetConfig, WideResNetForImageClassification
from hf_aace.hub import AUTO_MODEL_CLASSES, _pipeline_name, auto_model_class, build_model_card, saved_processor_class

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Every word of the snippets' example texts, so that the tiny tokenizer gives real ids rather than [UNK].
WORDS = (
    "hello world hf_aace trains models with adaptive adversarial cross-entropy. what does train aace-sam. "
    "the model was trained sharpness-aware minimization. a hammer."
).split()
VOCAB = {token: i for i, token in enumerate(SPECIALS + WORDS)}
PAD, CLS, SEP = 0, 2, 3
TEXT = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}


def save_tokenizer(folder: Path) -> None:
    """A word-level tokenizer with BERT's special tokens, saved as a `tokenizers` file: nothing to download."""
    backend = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", eos_token="[SEP]", bos_token="[CLS]",
    )  # fmt: skip
    tokenizer.save_pretrained(folder)


def bert(head: type) -> Callable[[Path], object]:
    def build(folder: Path):
        save_tokenizer(folder)
        # The default two labels: a question-answering head reads them as the start and end logits.
        return head(BertConfig(vocab_size=len(VOCAB), max_position_embeddings=32, **TEXT))

    return build


def gpt2(folder: Path):
    save_tokenizer(folder)
    config = GPT2Config(vocab_size=len(VOCAB), n_positions=32, n_embd=16, n_layer=1, n_head=2)
    return GPT2LMHeadModel(config)


def t5(folder: Path):
    save_tokenizer(folder)
    config = T5Config(
        vocab_size=len(VOCAB), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, pad_token_id=PAD,
        eos_token_id=SEP, decoder_start_token_id=PAD,
    )  # fmt: skip
    return T5ForConditionalGeneration(config)


def bart(folder: Path):
    save_tokenizer(folder)
    config = BartConfig(
        vocab_size=len(VOCAB), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
        pad_token_id=PAD, bos_token_id=CLS, eos_token_id=SEP, decoder_start_token_id=CLS, forced_eos_token_id=SEP,
    )  # fmt: skip
    return BartForConditionalGeneration(config)


def wav2vec2_config(**overrides) -> Wav2Vec2Config:
    return Wav2Vec2Config(
        conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2, classifier_proj_size=8, **TEXT, **overrides,
    )  # fmt: skip


def wav2vec2_classifier(folder: Path):
    Wav2Vec2FeatureExtractor().save_pretrained(folder)  # a feature extractor in preprocessor_config.json
    return Wav2Vec2ForSequenceClassification(wav2vec2_config(num_labels=2))


def wav2vec2_ctc(folder: Path):
    letters = {token: i for i, token in enumerate(["<pad>", "<s>", "</s>", "<unk>", "|", *"abcde"])}
    (folder / "vocab.json").parent.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(letters))
    tokenizer = Wav2Vec2CTCTokenizer(str(folder / "vocab.json"))
    Wav2Vec2Processor(feature_extractor=Wav2Vec2FeatureExtractor(), tokenizer=tokenizer).save_pretrained(folder)
    return Wav2Vec2ForCTC(wav2vec2_config(vocab_size=len(letters), pad_token_id=0))


def vit(folder: Path):
    ViTImageProcessor(size={"height": 8, "width": 8}).save_pretrained(folder)
    config = ViTConfig(image_size=8, patch_size=4, num_labels=3, **TEXT)
    return ViTForImageClassification(config)


def wide_resnet(folder: Path):
    AACEImageProcessor(size={"height": 8, "width": 8}).save_pretrained(folder)
    return WideResNetForImageClassification(WideResNetConfig(depth=10, widen_factor=1, num_labels=3))


IMAGE = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
AUDIO = np.random.default_rng(0).standard_normal(1600).astype(np.float32)
PIPELINE_INPUTS = {  # a small input, and keyword arguments, for each pipeline a snippet can show
    "image-classification": ((IMAGE,), {}),
    "text-classification": (("hello world",), {}),
    "token-classification": (("hello world",), {}),
    "fill-mask": (("hello [MASK]",), {}),
    "text-generation": (("hello",), {"max_new_tokens": 2}),
    "audio-classification": ((AUDIO,), {}),
    "automatic-speech-recognition": ((AUDIO,), {}),
}


@dataclasses.dataclass
class Case:
    build: Callable[[Path], object]  # saves the processor into the folder, returns the model
    head: str  # the class the snippet must load
    processor: str | None  # what `saved_processor_class` reads from the folder
    pipeline: str | None = None  # the pipeline the snippet builds; None: a direct call, or nothing to run
    tasks: str | None = None  # the Trainer's `tasks` card option; None: the card derives the task
    prints: bool = False  # the snippet runs the model itself and prints its result
    auto: str | None = None  # the Auto class the snippet must name, where the head alone does not tell


CASES = {
    "image-classification-wide-resnet": Case(
        wide_resnet, "WideResNetForImageClassification", "AutoImageProcessor", "image-classification"
    ),
    "image-classification-vit": Case(vit, "ViTForImageClassification", "AutoImageProcessor", "image-classification"),
    "text-classification": Case(
        bert(BertForSequenceClassification), "BertForSequenceClassification", "AutoTokenizer", "text-classification"
    ),
    "token-classification": Case(
        bert(BertForTokenClassification), "BertForTokenClassification", "AutoTokenizer", "token-classification"
    ),
    "fill-mask": Case(bert(BertForMaskedLM), "BertForMaskedLM", "AutoTokenizer", "fill-mask"),
    "text-generation": Case(gpt2, "GPT2LMHeadModel", "AutoTokenizer", "text-generation"),
    "question-answering": Case(
        bert(BertForQuestionAnswering), "BertForQuestionAnswering", "AutoTokenizer", prints=True
    ),
    "multiple-choice": Case(bert(BertForMultipleChoice), "BertForMultipleChoice", "AutoTokenizer", prints=True),
    "text2text-generation": Case(t5, "T5ForConditionalGeneration", "AutoTokenizer", prints=True),
    "summarization": Case(bart, "BartForConditionalGeneration", "AutoTokenizer", tasks="summarization", prints=True),
    "translation": Case(t5, "T5ForConditionalGeneration", "AutoTokenizer", tasks="translation", prints=True),
    "audio-classification": Case(
        wav2vec2_classifier, "Wav2Vec2ForSequenceClassification", "AutoFeatureExtractor", "audio-classification"
    ),
    "automatic-speech-recognition": Case(
        wav2vec2_ctc, "Wav2Vec2ForCTC", "AutoProcessor", "automatic-speech-recognition"
    ),
    "no-task": Case(bert(BertModel), "BertModel", "AutoTokenizer", auto="AutoModel"),
    # A task given by hand that does not fit the model keeps the model's own head.
    "mismatched-task": Case(wav2vec2_ctc, "Wav2Vec2ForCTC", "AutoProcessor", tasks="text-classification"),
}


def how_to_use(card: str) -> str:
    """The python block under "## How to use"."""
    match = re.search(r"## How to use\n\n```python\n(.*?)\n```", card, re.DOTALL)
    assert match, card
    return match.group(1)


def run_snippet(code: str) -> dict:
    namespace: dict = {}
    exec(compile(code, "<card snippet>", "exec"), namespace)
    return namespace


@pytest.mark.parametrize("name", CASES)
def test_card_snippet_runs_against_a_local_save(name, tmp_path, capsys):
    case = CASES[name]
    folder = tmp_path / "model"
    folder.mkdir()
    model = case.build(folder)
    model.save_pretrained(folder)
    processor = saved_processor_class(str(folder))
    assert processor == case.processor
    card = str(
        build_model_card(
            model, {}, {}, method="aace", model_name="m", repo_id=str(folder), processor_class=processor,
            tasks=case.tasks,
        )
    )  # fmt: skip
    code = how_to_use(card)
    namespace = run_snippet(code)
    printed = capsys.readouterr().out.strip()  # loading reports on stderr; the snippet's own result on stdout
    assert type(namespace["model"]).__name__ == case.head, code
    assert case.auto is None or f"model = {case.auto}.from_pretrained" in code, code
    variable = "tokenizer" if processor == "AutoTokenizer" else "processor"
    assert f"{variable} = {processor}.from_pretrained" in code
    if case.pipeline is None:
        assert "pipeline" not in code and "pipe" not in namespace, code
    else:
        assert f'pipe = pipeline("{case.pipeline}"' in code
        args, kwargs = PIPELINE_INPUTS[case.pipeline]
        assert namespace["pipe"](*args, **kwargs), code
    assert bool(printed) == case.prints, (code, printed)  # a direct call ran and printed its result


def test_peft_adapter_snippet_loads_the_adapter_onto_its_base(tmp_path):
    peft = pytest.importorskip("peft")
    base_folder, adapter_folder = tmp_path / "base", tmp_path / "adapter"
    base_folder.mkdir()
    base = bert(BertForSequenceClassification)(base_folder)
    base.save_pretrained(base_folder)
    base.name_or_path = str(base_folder)  # as from_pretrained sets it; the card names it as the base
    lora = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS"))
    lora.save_pretrained(adapter_folder)
    save_tokenizer(adapter_folder)  # the Trainer saves the tokenizer next to the adapter
    card = str(
        build_model_card(
            lora, {}, {}, method="aace", model_name="m", repo_id=str(adapter_folder),
            processor_class=saved_processor_class(str(adapter_folder)),
        )
    )  # fmt: skip
    code = how_to_use(card)
    namespace = run_snippet(code)
    assert type(namespace["base"]).__name__ == "BertForSequenceClassification", code
    assert isinstance(namespace["model"], peft.PeftModel) and "pipeline" not in code
    inputs = namespace["tokenizer"]("hello world", return_tensors="pt")
    assert namespace["model"](**inputs).logits.shape == (1, 2)


@pytest.mark.parametrize("task", sorted(AUTO_MODEL_CLASSES))
def test_every_card_task_loads_its_models_with_their_heads_and_names_a_real_pipeline(task):
    names = TASK_MAPPING.get(task) or {
        model_class: model_class for auto in AUTO_MODEL_CLASSES[task] for model_class in _mapping(auto).values()
    }
    assert AUTO_MODEL_CLASSES[task], task
    for model_class in set(names.values()):
        auto = auto_model_class(task, model_class)
        assert auto in AUTO_MODEL_CLASSES[task] and model_class in _mapping(auto).values(), (task, model_class)
        for processor in ("AutoTokenizer", "AutoImageProcessor", "AutoFeatureExtractor", "AutoProcessor"):
            shown = _pipeline_name(task, auto, processor)
            if shown is not None:  # `pipeline()` knows the name and loads this head for it
                normalized, targeted, _ = check_task(shown)
                assert auto in {cls.__name__ for cls in targeted["pt"]}, (task, shown, auto)
                assert normalized in SUPPORTED_TASKS


def _mapping(auto: str) -> dict[str, str]:
    import transformers

    return getattr(transformers, auto)._model_mapping._model_mapping
