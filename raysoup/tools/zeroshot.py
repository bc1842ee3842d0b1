"""Zero-shot classifiers: a pretrained CLIP plus a linear head built from class names.

The head is open_clip's zero-shot classifier (each class: its prompts through the text
tower, each embedding L2-normalised, averaged, normalised again), scaled by the model's
logit scale, with a zero bias: the model soups convention, so the result is an ingredient
in our layout. It initialises fine-tunes and is the "pretrained" reference row of a report
(the manifest's `pretrained`).

Pretrained weights come from a local file, or from an open_clip tag whose weights already
sit in the local Hugging Face cache: raysoup never downloads.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import open_clip
import torch
from open_clip import zero_shot_metadata

from ..errors import RaysoupError
from ..families.transformers import _hf, tokenizer
from ..inputs.model import arch_config, clip_model, to_classifier_layout
from ..inputs.pool import StateDict
from ..inputs.weights import load_state_dict

TEMPLATES = {
    "openai": zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES,
    "simple": zero_shot_metadata.SIMPLE_IMAGENET_TEMPLATES,
}
# open_clip's weight files on the Hugging Face hub, safetensors first.
HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def resolve_pretrained(arch: str, pretrained: str) -> str:
    """A checkpoint file for `pretrained`: a path as given, or a tag's file in the local
    Hugging Face cache. Fails at once, without network, when it is not there."""
    if Path(pretrained).expanduser().is_file():
        return str(Path(pretrained).expanduser())
    cfg = open_clip.get_pretrained_cfg(arch, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise RaysoupError(
            f"pretrained {pretrained!r}: neither a file nor an open_clip tag of "
            f"{arch} (tags: {', '.join(tags) or 'none'})"
        )
    if cfg.get("quick_gelu") and "quickgelu" not in arch.lower():
        raise RaysoupError(
            f"the {pretrained!r} weights were trained with QuickGELU: use arch "
            f"{arch}-quickgelu (model soups ingredients need it too)"
        )
    from huggingface_hub import hf_hub_download

    # "org/model/" or "org/model/file", as open_clip splits it
    repo_id, filename = os.path.split(cfg.get("hf_hub", ""))
    for name in ([filename] if filename else HF_WEIGHT_FILES) if repo_id else []:
        try:
            return hf_hub_download(repo_id, name, local_files_only=True)
        except Exception:  # noqa: BLE001, S112 - any miss means "not cached"; we never download
            continue
    raise RaysoupError(
        f"pretrained weights {arch}/{pretrained} are not on this machine, and raysoup never "
        f"downloads (looked in the Hugging Face cache for {repo_id or 'a hub entry'}). Fetch "
        f"them once where there is network (`huggingface-cli download {repo_id}`), or give "
        f"the path of a checkpoint file"
    )


def load_clip(arch: str, pretrained: str) -> torch.nn.Module:
    """CLIP with text tower; weights loaded without executing code from the file."""
    arch_config(arch)  # a clear error for an unknown or unsupported architecture
    model = clip_model(arch)
    path = resolve_pretrained(arch, pretrained)
    try:
        model.load_state_dict(load_state_dict(path), strict=True)
    except RuntimeError as e:
        raise RaysoupError(
            f"{path} is not an open_clip {arch} checkpoint: {str(e).splitlines()[0]}"
        ) from None
    return model.eval()


def read_lines(path: str | Path, what: str) -> list[str]:
    try:
        lines = [s.strip() for s in Path(path).read_text().splitlines()]
    except OSError as e:
        raise RaysoupError(f"cannot read {what} file {path}: {e}") from e
    lines = [s for s in lines if s]
    if not lines:
        raise RaysoupError(f"{what} file {path} is empty")
    return lines


def templates_for(name_or_file: str) -> Sequence[str]:
    """A built-in prompt set (openai: 80 prompts, simple: 7) or a file, one `{}` prompt per
    line."""
    if name_or_file in TEMPLATES:
        return TEMPLATES[name_or_file]
    templates = read_lines(name_or_file, "templates")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise RaysoupError(
            f"templates file {name_or_file}: prompt {bad[0]!r} has no '{{}}' for the class name"
        )
    return templates


@torch.no_grad()
def zeroshot_classifier(
    clip: torch.nn.Module, arch: str, classnames: Sequence[str], templates: Sequence
) -> StateDict:
    """The classifier state dict (our layout) of `clip` with a zero-shot head."""
    if len(set(classnames)) != len(classnames):
        raise RaysoupError("class names must be distinct")
    weights = open_clip.build_zero_shot_classifier(
        clip, open_clip.get_tokenizer(arch), classnames, templates
    )  # (embed_dim, classes)
    head = (weights.T * clip.logit_scale.exp()).contiguous()
    state = to_classifier_layout({f"model.{k}": v for k, v in clip.state_dict().items()})
    state["classification_head.weight"] = head
    state["classification_head.bias"] = torch.zeros(len(classnames))
    return state


@torch.no_grad()
def hf_zeroshot_classifier(
    folder: str, classnames: Sequence[str], templates: Sequence
) -> StateDict:
    """The ClipClassifier state dict of the CLIPModel saved in `folder` (with its tokenizer)
    and a zero-shot head: per class, its prompts through the text tower, each embedding
    L2-normalised, averaged, normalised again; scaled by the logit scale, zero bias (as
    zeroshot_classifier builds it for open_clip)."""
    if len(set(classnames)) != len(classnames):
        raise RaysoupError("class names must be distinct")
    try:
        clip = _hf().CLIPModel.from_pretrained(folder).eval()
    except (OSError, ValueError) as e:
        raise RaysoupError(f"{folder}: not a saved CLIPModel ({str(e).splitlines()[0]})") from None
    tok = tokenizer(folder)
    rows = []
    for name in classnames:
        prompts = [t(name) if callable(t) else t.format(name) for t in templates]
        tokens = tok(prompts, padding=True, return_tensors="pt")
        embeds = clip.get_text_features(**tokens)
        embeds = getattr(embeds, "pooler_output", embeds)  # a tensor, or an output object
        embeds = embeds / embeds.norm(dim=-1, keepdim=True)
        mean = embeds.mean(dim=0)
        rows.append(mean / mean.norm())
    state = {
        k: v
        for k, v in clip.state_dict().items()
        if k.startswith(("vision_model.", "visual_projection."))
    }
    state["head.weight"] = (torch.stack(rows) * clip.logit_scale.exp()).contiguous()
    state["head.bias"] = torch.zeros(len(classnames))
    return state
