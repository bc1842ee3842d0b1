"""The embedded testbed: a miniature of the model soups setting on Fashion-MNIST.

One shared "pretrained" model is trained with broad augmentation (the analog of CLIP's
broad pretraining); each ingredient fine-tunes it on its own random part of the clean
training split with hyperparameters drawn at random, as in the model soups paper. Validation rows are held out
of all training; the official test set and its shifted copies only report.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from tqdm import tqdm

from ..errors import RaysoupError
from ..evaluate import VAL, Evaluator
from ..inputs.data import content_sha256, read_eval_set, write_eval_set
from ..inputs.model import ModelSpec, build_classifier
from ..inputs.storage import atomic, write_json
from ..inputs.weights import file_sha256, load_state_dict, save_state_dict
from . import fashion_mnist

logger = logging.getLogger(__name__)

ZOO_FORMAT = 1
# The default zoo (seed 0), shipped: its weights and manifest, without the evaluation sets
# (made from Fashion-MNIST, bitwise the same everywhere). CPU training is not bitwise
# reproducible across CPU models and thread counts, so building it again here would not
# give the README's numbers.
SHIPPED_ZOO = Path(__file__).with_name("image_zoo")
AUGMENT_CHUNK = 8  # images per augmentation draw: per-chunk randomness at batch speed


@dataclass(frozen=True)
class ZooConfig:
    ingredients: int = 12
    seed: int = 0
    val_size: int = 6000
    train_size: int | None = None  # a subset of the training rows (small test zoos)
    test_size: int | None = None  # a subset of the official test set
    batch_size: int = 128
    pretrain_epochs: float = 24.0
    pretrain_lr: float = 2e-3
    # The pretrained model is the analog of CLIP's weights: one for every zoo seed, which
    # varies the fine-tunes only (as the model soups zoo fine-tunes one CLIP 72 times).
    pretrain_seed: int = 0
    # Fine-tuning hyperparameters are drawn per ingredient from these ranges (see README,
    # "The testbed"). From a strong pretrained model, every fine-tune is trained close to
    # convergence (cosine decay to zero) with nearly the same learning rate and length, so
    # none dominates on val and all stay in one basin. Each sees its own random part of the
    # training split (`finetune_data_fraction`), as in lo-fi (Wortsman et al. 2022), so the
    # fine-tunes differ in what they learned, and their average knows more than any one;
    # label smoothing, weight decay, light augmentation and data order add to that.
    # Mixup (alpha drawn from `finetune_mixup`, for half the fine-tunes) is off by default:
    # it cost 0.5-1 point of val here.
    finetune_data_fraction: float = 0.25
    finetune_epochs: tuple[float, float] = (3.6, 4.4)  # over the fine-tune's part
    finetune_lr: tuple[float, float] = (2.8e-4, 3.2e-4)  # log-uniform
    finetune_weight_decay: tuple[float, float] = (0.0, 0.1)
    finetune_label_smoothing: tuple[float, float] = (0.0, 0.1)
    finetune_augment: tuple[float, float] = (0.0, 0.3)  # strength of the light augmentation
    finetune_mixup: tuple[float, float] = (0.0, 0.0)
    model: ModelSpec = field(default_factory=ModelSpec)

    def to_dict(self) -> dict:
        return {**asdict(self), "model": self.model.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> ZooConfig:
        d = dict(d)
        d["model"] = ModelSpec.from_dict(d["model"])
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


QUICK_ZOO = ZooConfig(
    ingredients=6,
    val_size=2000,
    train_size=20000,
    test_size=2000,
    pretrain_epochs=4.0,
    finetune_epochs=(1.0, 1.5),
    finetune_data_fraction=0.5,
)


def pretrain_augment() -> v2.Transform:
    """Broad augmentation; deliberately without elastic warps (the unseen test shift)."""
    return v2.Compose(
        [
            v2.RandomAffine(degrees=35, translate=(0.12, 0.12), scale=(0.7, 1.1), shear=10),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.GaussianBlur(kernel_size=5, sigma=(0.1, 2.0))], p=0.3),
            v2.RandomApply([v2.ColorJitter(brightness=0.5, contrast=0.7)], p=0.5),
            v2.RandomApply([v2.GaussianNoise(sigma=0.15)], p=0.3),
            v2.RandomInvert(p=0.2),
        ]
    )


def finetune_augment(strength: float) -> v2.Transform:
    """Light, in-distribution augmentation whose strength is a drawn hyperparameter."""
    return v2.Compose(
        [
            v2.RandomAffine(degrees=10 * strength, translate=(0.08 * strength, 0.08 * strength)),
            v2.RandomHorizontalFlip(p=0.5 * strength),
            v2.RandomErasing(p=0.5 * strength, scale=(0.02, 0.02 + 0.15 * strength), value=0),
        ]
    )


def _augment_batch(images: torch.Tensor, transform: v2.Transform | None) -> torch.Tensor:
    x = images.float().div_(255.0)
    if transform is None:
        return x
    chunks = [transform(c) for c in x.split(AUGMENT_CHUNK)]
    return torch.cat(chunks).clamp_(0.0, 1.0)


def train(
    model: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: float,
    lr: float,
    weight_decay: float,
    label_smoothing: float,
    batch_size: int,
    transform: v2.Transform | None,
    seed: int,
    desc: str,
    mixup: float = 0.0,
) -> None:
    """AdamW with linear warm-up and cosine decay to zero; mixup with alpha `mixup` (0: off)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    mix_rng = np.random.default_rng(seed)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    steps = max(1, math.ceil(epochs * len(y) / batch_size))
    warmup = max(1, steps // 20)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / steps)))
    )
    model.train()
    order = torch.empty(0, dtype=torch.long)
    for _ in tqdm(range(steps), desc=desc, unit="step", leave=False, mininterval=2.0):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(y), generator=gen)])
        idx, order = order[:batch_size], order[batch_size:]
        inputs, targets = _augment_batch(x[idx], transform), y[idx]
        if mixup > 0:
            lam = float(mix_rng.beta(mixup, mixup))
            partner = torch.randperm(len(idx), generator=gen)
            logits = model(lam * inputs + (1 - lam) * inputs[partner])
            loss = lam * F.cross_entropy(logits, targets, label_smoothing=label_smoothing) + (
                1 - lam
            ) * F.cross_entropy(logits, targets[partner], label_smoothing=label_smoothing)
        else:
            loss = F.cross_entropy(model(inputs), targets, label_smoothing=label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()


def draw_hyperparameters(config: ZooConfig, index: int) -> dict:
    rng = np.random.default_rng([config.seed, index])
    lo, hi = config.finetune_lr
    return {
        "lr": float(math.exp(rng.uniform(math.log(lo), math.log(hi)))),
        "weight_decay": float(rng.uniform(*config.finetune_weight_decay)),
        "label_smoothing": float(rng.uniform(*config.finetune_label_smoothing)),
        "epochs": float(rng.uniform(*config.finetune_epochs)),
        "augment": float(rng.uniform(*config.finetune_augment)),
        "seed": int(rng.integers(2**31)),
        "mixup": float(rng.uniform(*config.finetune_mixup)) if rng.random() < 0.5 else 0.0,
    }


def _cached(path: Path, sidecar: Path, hyperparameters: dict) -> dict | None:
    """The sidecar of a finished training with these hyperparameters (a copied-in
    pretrained model too), if the file is intact."""
    if path.is_file() and sidecar.is_file():
        info = json.loads(sidecar.read_text())
        if (
            info.get("sha256") == file_sha256(path)
            and info.get("hyperparameters") == hyperparameters
        ):
            return info
    return None


def build_zoo(out: Path, config: ZooConfig) -> Path:
    """Build (or finish building) a zoo in `out`; deterministic for a config and seed."""
    out = Path(out)
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("config") != json.loads(json.dumps(config.to_dict())):
            raise RaysoupError(
                f"{out} holds a zoo built with a different config; choose "
                "another --out or delete it"
            )
        return out
    out.mkdir(parents=True, exist_ok=True)
    (out / "ingredients").mkdir(exist_ok=True)
    (out / "data").mkdir(exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.time()

    arrays = fashion_mnist.load_fashion_mnist()
    train_idx = fashion_mnist.train_val_split(len(arrays["train_labels"]), config.val_size)[0]
    if config.train_size is not None:
        train_idx = np.sort(
            np.random.default_rng(config.seed).choice(train_idx, config.train_size, replace=False)
        )
    train_x, train_y = arrays["train_images"][train_idx], arrays["train_labels"][train_idx]

    eval_files = write_eval_sets(out, config, arrays)
    val_set = read_eval_set(out / eval_files[VAL]["file"])
    evaluator = Evaluator(config.model, [val_set], device="cpu")

    def trained(name: str, base: Path | None, hp: dict, transform, desc: str) -> dict:
        path, sidecar = out / name, out / (name + ".json")
        cached = _cached(path, sidecar, hp)
        if cached:
            logger.info(f"[zoo] {desc}: cached (val {cached['val_acc']:.4f})")
            return cached
        torch.manual_seed(hp["seed"])  # the initial weights too (pretraining starts from them)
        model = build_classifier(config.model)
        rows = slice(None)
        if base is not None:  # a fine-tune: its own part of the training split
            model.load_state_dict(load_state_dict(base))
            rows = np.sort(
                np.random.default_rng(hp["seed"]).choice(
                    len(train_y), round(config.finetune_data_fraction * len(train_y)), replace=False
                )
            )
        train(
            model,
            train_x[rows],
            train_y[rows],
            epochs=hp["epochs"],
            lr=hp["lr"],
            weight_decay=hp["weight_decay"],
            label_smoothing=hp["label_smoothing"],
            batch_size=config.batch_size,
            transform=transform,
            seed=hp["seed"],
            desc=desc,
            mixup=hp.get("mixup", 0.0),
        )
        sd = model.state_dict()
        save_state_dict(sd, path)
        info = {
            "file": name,
            "hyperparameters": hp,
            "val_acc": evaluator.accuracy(sd, VAL),
            "sha256": file_sha256(path),
        }
        write_json(sidecar, info)
        logger.info(f"[zoo] {desc}: val {info['val_acc']:.4f} ({time.time() - t0:.0f}s)")
        return info

    pre_hp = {
        "lr": config.pretrain_lr,
        "weight_decay": 0.05,
        "label_smoothing": 0.0,
        "epochs": config.pretrain_epochs,
        "seed": config.pretrain_seed,
    }
    pretrained = trained("pretrained.safetensors", None, pre_hp, pretrain_augment(), "pretrain")
    ingredients = []
    for i in range(config.ingredients):
        hp = draw_hyperparameters(config, i)
        info = trained(
            f"ingredients/ft-{i:02d}.safetensors",
            out / "pretrained.safetensors",
            hp,
            finetune_augment(hp["augment"]),
            f"fine-tune {i + 1}/{config.ingredients}",
        )
        ingredients.append({"name": f"ft-{i:02d}", **info})

    manifest = {
        "format": ZOO_FORMAT,
        "config": config.to_dict(),
        "model": config.model.to_dict(),
        "pretrained": pretrained,
        "ingredients": ingredients,
        "eval_sets": eval_files,
        "build_seconds": round(time.time() - t0, 1),
    }
    write_json(manifest_path, manifest)
    return out


def write_eval_sets(out: Path, config: ZooConfig, arrays: dict[str, np.ndarray]) -> dict:
    """val, id and the shifted sets as Arrow files under out/data; their manifest entries,
    each with its content sha256."""
    val_idx = fashion_mnist.train_val_split(len(arrays["train_labels"]), config.val_size)[1]
    (out / "data").mkdir(parents=True, exist_ok=True)
    eval_files = {}
    for s in fashion_mnist.build_eval_sets(arrays, val_idx, config.test_size):
        path = out / "data" / f"{s.name}.arrow"
        write_eval_set(s, path)
        eval_files[s.name] = {
            "file": str(path.relative_to(out)),
            "rows": len(s),
            "sha256": content_sha256(s),
        }
    return eval_files


def install_shipped_zoo(out: Path, shipped: Path = SHIPPED_ZOO) -> Path:
    """The shipped default zoo in `out`: its weights copied, its evaluation sets made from
    Fashion-MNIST and checked against the sha256 the shipped manifest records (the weights
    are checked by every run). The same files on every machine."""
    out = Path(out)
    if (out / "manifest.json").is_file():
        return out
    manifest = json.loads((shipped / "manifest.json").read_text())
    with atomic(out) as tmp:
        shutil.copytree(shipped, tmp, ignore=shutil.ignore_patterns("*.tmp", "__pycache__"))
        where = fashion_mnist.data_dir()
        logger.info(f"[zoo] making the evaluation sets from Fashion-MNIST ({where})")
        made = write_eval_sets(
            tmp, ZooConfig.from_dict(manifest["config"]), fashion_mnist.load_fashion_mnist()
        )
        for name, entry in manifest["eval_sets"].items():
            if made.get(name, {}).get("sha256") != entry["sha256"]:
                raise RaysoupError(
                    f"evaluation set {name!r} made on this machine differs from the shipped "
                    f"zoo's (sha256 {made.get(name, {}).get('sha256', 'missing')[:16]}... vs "
                    f"{entry['sha256'][:16]}...): is {where} the Debian package's "
                    f"Fashion-MNIST, and numpy/scipy as in constraints.txt?"
                )
    return out


def with_overrides(config: ZooConfig, **overrides) -> ZooConfig:
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})
