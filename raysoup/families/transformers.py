"""`transformers`: any Hugging Face AutoModelForSequenceClassification or
AutoModelForImageClassification saved with save_pretrained, and HF CLIP as an image
classifier (task "clip-classification", raysoup.families.hf_clip).

    "model": {"family": "transformers", "task": "sequence-classification",
              "path": "pretrained", "num_classes": 4}

`path` is a folder beside the manifest with the config.json (and, for text, the tokenizer
saved with save_pretrained; for images, optionally preprocessor_config.json for the mean
and std). The skeleton is built from the config alone (from_config, nothing downloaded).
Ingredients are save_pretrained folders (model.safetensors, or shards with
model.safetensors.index.json; fp32, fp16 or bf16: mixed in fp32, exported back in the
ingredient's dtype), plain state-dict files, or PEFT LoRA adapters of `path`'s model.
A clip-classification model's `path` holds a CLIPConfig or CLIPVisionConfig (and the image
processor); its ingredients are state-dict files (safetensors or torch), exported as such.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from ..components import BLOCK_PRESETS
from ..errors import RaysoupError
from ..typed import section_config, validate
from .base import Batch, Family, StateDict, as_float32, register, relative_folder

TASKS = {
    "sequence-classification": "AutoModelForSequenceClassification",
    "image-classification": "AutoModelForImageClassification",
    "clip-classification": "CLIPVisionModelWithProjection plus a linear head",
}
CLIP = "clip-classification"
ADAPTER_CONFIG = "adapter_config.json"


@section_config
class TransformersSpec:
    task: Annotated[
        Literal["sequence-classification", "image-classification", "clip-classification"],
        Field(
            description="the model class: AutoModelForSequenceClassification, "
            "AutoModelForImageClassification, or HF CLIP's vision tower plus a linear "
            "head"
        ),
    ]
    path: Annotated[
        str,
        Field(
            description="the save_pretrained model folder beside the manifest (absolute once read "
            "from a manifest)"
        ),
    ]
    num_classes: Annotated[int, Field(ge=2, description="the classifier head's classes")]
    max_length: Annotated[
        int, Field(ge=1, description="text: every row padded or truncated to this many tokens")
    ] = 128
    family: ClassVar[str] = "transformers"

    def to_dict(self) -> dict:
        return {"family": self.family, **asdict(self)}


def _hf():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a folder on disk; never the Hub
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # a bar per ingredient load, in every actor
    return transformers


@functools.cache
def hf_config(path: str):
    try:
        return _hf().AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RaysoupError(
            f"model folder {path}: config.json does not build a Hugging Face "
            f"config ({str(e).splitlines()[0]})"
        ) from None


# Without one of these, AutoTokenizer builds an empty tokenizer of the config's model type.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
)


@functools.cache
def tokenizer(path: str):
    missing = "none of " + ", ".join(TOKENIZER_FILES)
    try:
        if any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
            return _hf().AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        missing = str(e).splitlines()[0]
    raise RaysoupError(
        f"model folder {path}: no tokenizer for the text sets (save one there "
        f"with tokenizer.save_pretrained; {missing})"
    )


@functools.cache
def _normalisation(path: str, channels: int) -> tuple[tuple, tuple, float]:
    """(mean, std, rescale) of the image processor saved beside the model, else ViT's."""
    file = Path(path) / "preprocessor_config.json"
    cfg = json.loads(file.read_text()) if file.is_file() else {}
    mean, std = cfg.get("image_mean", [0.5] * channels), cfg.get("image_std", [0.5] * channels)
    if not cfg.get("do_normalize", True):
        mean, std = [0.0] * channels, [1.0] * channels
    return tuple(mean), tuple(std), float(cfg.get("rescale_factor", 1 / 255))


def _from_pretrained(spec: TransformersSpec, folder: Path, dtype=torch.float32):
    """A save_pretrained folder (one safetensors file or shards) through transformers' own
    loading, which maps the names on disk to the model's (they differ for some models in
    transformers 5); a folder that does not fill the model exactly is refused."""
    from ..inputs.weights import CheckpointError

    auto = getattr(_hf(), TASKS[spec.task])
    try:
        model, info = auto.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(
            f"{folder}: from_pretrained cannot load it as the model at "
            f"{spec.path} ({str(e).splitlines()[0][:300]})"
        ) from None
    wrong = {
        k: v
        for k, v in info.items()
        if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v
    }
    if wrong:
        what, keys = next(iter(wrong.items()))
        raise CheckpointError(
            f"{folder}: does not match the model at {spec.path} "
            f"({what.replace('_', ' ')}: {sorted(map(str, keys))[:3]}, "
            f"{len(keys)} in all)"
        )
    return model


class Transformers(Family):
    name = "transformers"
    presets = BLOCK_PRESETS

    def spec_from_dict(self, entry: dict, where: str) -> TransformersSpec:
        spec = validate(TransformersSpec, entry, where, "model.", "model")
        folder = relative_folder(where, spec.path, "model.path")
        config = hf_config(folder)
        if spec.task != CLIP and config.num_labels != spec.num_classes:
            raise RaysoupError(
                f"{where}: model.num_classes = {spec.num_classes}, but "
                f"{folder}/config.json has {config.num_labels} labels"
            )
        spec = replace(spec, path=folder)
        self.template(spec)  # a config that does not build fails here, in one line
        return spec

    def build(self, spec: TransformersSpec, device: str = "cpu"):
        try:
            with torch.device(device):
                if spec.task == CLIP:
                    from .hf_clip import ClipClassifier

                    return ClipClassifier(hf_config(spec.path), spec.num_classes)
                auto = getattr(_hf(), TASKS[spec.task])
                return auto.from_config(hf_config(spec.path), dtype=torch.float32)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise RaysoupError(
                f"model folder {spec.path}: its config does not build a "
                f"{TASKS[spec.task]} ({str(e).splitlines()[0]})"
            ) from None

    def inputs(self, spec: TransformersSpec):
        if spec.task == "sequence-classification":
            return "text"
        config = hf_config(spec.path)
        if spec.task == CLIP:
            from .hf_clip import vision_config

            config = vision_config(config)
        size = config.image_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (config.num_channels, *size)

    def check_text(self, spec: TransformersSpec) -> None:
        tokenizer(spec.path)

    def encode(self, spec: TransformersSpec, columns) -> Batch:
        if not isinstance(columns, dict):  # images: normalised on the device, in forward
            return torch.from_numpy(np.array(columns))
        if "text" in columns:
            encoded = tokenizer(spec.path)(
                [str(t) for t in columns["text"]],
                padding="max_length",
                truncation=True,
                max_length=spec.max_length,
                return_tensors="pt",
            )
            return {k: v.to(torch.int64) for k, v in encoded.items()}
        # Pre-tokenised: truncated and padded to max_length, as the tokenizer would.
        pad = hf_config(spec.path).pad_token_id or 0
        ids = torch.full((len(columns["input_ids"]), spec.max_length), pad, dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(columns["input_ids"]):
            row = torch.as_tensor(np.asarray(row, dtype=np.int64)[: spec.max_length])
            ids[i, : len(row)], mask[i, : len(row)] = row, 1
        return {"input_ids": ids, "attention_mask": mask}

    def example_batch(self, spec: TransformersSpec) -> Batch:
        if spec.task == "sequence-classification":
            return {
                "input_ids": torch.zeros(2, 8, dtype=torch.int64),
                "attention_mask": torch.ones(2, 8, dtype=torch.int64),
            }
        return super().example_batch(spec)

    def arguments(self, spec: TransformersSpec, batch: Batch) -> tuple[tuple, dict]:
        if isinstance(batch, dict):
            return (), batch
        mean, std, rescale = _normalisation(spec.path, batch.shape[1])
        shape = (1, -1, 1, 1)
        x = batch.float() * rescale
        x = (x - torch.tensor(mean, device=x.device).view(shape)) / torch.tensor(
            std, device=x.device
        ).view(shape)
        return (), {"pixel_values": x}

    def logits(self, output) -> torch.Tensor:
        return output if isinstance(output, torch.Tensor) else output.logits

    def load_ingredient(self, spec: TransformersSpec, path: str) -> StateDict:
        folder = Path(path)
        if spec.task == CLIP and folder.is_dir():
            from ..inputs.weights import CheckpointError

            raise CheckpointError(
                f"{folder}: a clip-classification ingredient is one "
                f"state-dict file (vision_model.*, visual_projection.weight, "
                f"head.weight, head.bias), not a folder"
            )
        if (folder / ADAPTER_CONFIG).is_file():
            from .lora import merged_adapter

            return merged_adapter(spec, folder, self.base_weights(spec))
        if folder.is_dir():
            return as_float32(_from_pretrained(spec, folder).state_dict())
        from ..inputs.weights import load_state_dict

        return as_float32(load_state_dict(path))

    @functools.lru_cache(maxsize=1)  # noqa: B019 - one family object per process, by design
    def base_weights(self, spec: TransformersSpec) -> StateDict:
        """The model folder's own weights: what LoRA adapters are deltas to."""
        return as_float32(_from_pretrained(spec, Path(spec.path)).state_dict())

    def check_pool(self, spec: TransformersSpec, paths) -> None:
        from .lora import check_adapters

        check_adapters(
            spec, {n: Path(p) for n, p in paths.items() if (Path(p) / ADAPTER_CONFIG).is_file()}
        )

    def export(self, spec: TransformersSpec, fused: StateDict, like: str, out: Path) -> Path:
        """A save_pretrained folder in the dtype of ingredient `like`, with the model
        folder's tokenizer or image processor files, which from_pretrained loads; a LoRA
        adapter ingredient exports the whole merged model."""
        like_folder = Path(like)
        if spec.task == CLIP:
            from .base import export_state_dict_like

            return export_state_dict_like(fused, like, out)
        if (like_folder / ADAPTER_CONFIG).is_file() or not like_folder.is_dir():
            like_folder = Path(spec.path)
        model = _from_pretrained(spec, like_folder, dtype="auto")
        model.load_state_dict(fused, strict=True)  # copies, cast to the model's dtypes
        out = Path(out)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        for file in Path(spec.path).iterdir():  # tokenizer, image processor
            if (
                file.is_file()
                and file.suffix in (".json", ".txt", ".model")
                and not (tmp / file.name).exists()
                and not file.name.startswith("model")
            ):
                shutil.copy(file, tmp / file.name)
        shutil.rmtree(out, ignore_errors=True)
        tmp.replace(out)
        return out

    def describe(self, spec: TransformersSpec) -> str:
        return (
            f"{type(hf_config(spec.path)).__name__.removesuffix('Config')} "
            f"{spec.task} ({Path(spec.path).name})"
        )


register(Transformers())
