"""The text testbed: a miniature of the model soups setting on fortune-cookie topics.

A tiny BERT (an HF config, random init, trained here on CPU) classifies a fortune by its
category file (testbed.fortunes). As in the image testbed (testbed/image.py), one
shared "pretrained" model is the analog of a broadly pretrained checkpoint: masked-language
modelling on every training text, then the topic task on one part of the training split.
Each ingredient fine-tunes it on its own random share of the other part, with
hyperparameters drawn at random, so the fine-tunes differ in what they learned. Validation
rows are held out of all training; id and the shifted sets only report.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import stats
from ..errors import RaysoupError
from ..inputs.storage import atomic, write_json
from ..inputs.weights import file_sha256
from . import fortunes

logger = logging.getLogger(__name__)

TEXT_ZOO_FORMAT = 1
# The default text zoo (seed 0), shipped: weights, tokenizer and manifest; its evaluation
# sets are made at install from the fortunes package and checked by sha256.
SHIPPED_TEXT_ZOO = Path(__file__).with_name("text_zoo")
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD, UNK, CLS, SEP, MASK = range(len(SPECIALS))
WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class TextZooConfig:
    ingredients: int = 12
    seed: int = 0
    train_size: int | None = None  # a subset of the training rows (small test zoos)
    eval_size: int | None = None  # rows per evaluation set (small test zoos)
    vocab_size: int = 2048
    hidden_size: int = 64
    layers: int = 2
    heads: int = 2
    intermediate_size: int = 128
    max_positions: int = 128
    max_length: int = 64  # word pieces per text (the median text has 36)
    batch_size: int = 32
    # One thread: on a shared 2-core machine a second one mostly waits for the first.
    threads: int = 1
    # Pretraining: MLM over every training text (labels unused), then the topic task on
    # `pretrain_share` of the training rows. The fine-tunes draw their rows from the rest.
    mlm_epochs: float = 4.0
    mlm_lr: float = 2e-3
    pretrain_share: float = 0.5
    pretrain_epochs: float = 6.0
    pretrain_lr: float = 1e-3
    pretrain_seed: int = 0
    # Fine-tunes: each on its own random `finetune_data_fraction` of the rows the
    # pretraining's topic phase did not see, hyperparameters drawn per ingredient (lr
    # log-uniform); `token_dropout` drops each word piece of a training text with that
    # chance (augmentation; the word_dropout shift drops whole words at 0.3).
    finetune_data_fraction: float = 0.35
    finetune_epochs: tuple[float, float] = (3.0, 6.0)
    finetune_lr: tuple[float, float] = (5e-4, 1.5e-3)
    finetune_weight_decay: tuple[float, float] = (0.0, 0.1)
    finetune_label_smoothing: tuple[float, float] = (0.0, 0.1)
    finetune_token_dropout: tuple[float, float] = (0.0, 0.15)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TextZooConfig:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# A zoo of seconds, for tests.
TINY_TEXT_ZOO = TextZooConfig(
    ingredients=3,
    train_size=600,
    eval_size=100,
    vocab_size=300,
    hidden_size=32,
    intermediate_size=64,
    max_length=48,
    mlm_epochs=0.5,
    pretrain_epochs=10.0,
    pretrain_lr=5e-3,
    finetune_epochs=(1.0, 2.0),
    finetune_lr=(1e-3, 3e-3),
)


def train_tokenizer(texts: list[str], config: TextZooConfig):
    """A cased WordPiece tokenizer trained on `texts` (cased: the casing shift is then a
    real shift), as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import WordPieceTrainer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(
        texts, WordPieceTrainer(vocab_size=config.vocab_size, special_tokens=list(SPECIALS))
    )
    # The trainer numbers pieces of equal count in no fixed order; greedy WordPiece only
    # needs the set, so number it in a fixed order (specials first, then sorted).
    pieces = [*SPECIALS, *sorted(set(tok.get_vocab()) - set(SPECIALS))]
    tok.model = models.WordPiece({p: i for i, p in enumerate(pieces)}, unk_token="[UNK]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=config.max_length,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def bert_config(config: TextZooConfig, vocab_size: int):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_positions,
        pad_token_id=PAD,
        num_labels=len(fortunes.CLASSES),
        id2label=dict(enumerate(fortunes.CLASSES)),
        label2id={c: i for i, c in enumerate(fortunes.CLASSES)},
    )


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, truncation=True, max_length=tokenizer.model_max_length)["input_ids"]


def pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of rows padded to the longest."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    return ids, (ids != PAD).long()


def length_batches(rows: list[list[int]], batch_size: int, gen: torch.Generator) -> list[list[int]]:
    """One epoch of batches in random order, each of rows of similar length (sorted within
    random groups of 16 batches), so little of a batch is padding."""
    order = torch.randperm(len(rows), generator=gen).tolist()
    group = 16 * batch_size
    batches = []
    for start in range(0, len(order), group):
        part = sorted(order[start : start + group], key=lambda i: len(rows[i]))
        batches += [part[j : j + batch_size] for j in range(0, len(part), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def drop_tokens(row: list[int], rate: float, rng: np.random.Generator) -> list[int]:
    """The augmentation: each word piece (not [CLS]/[SEP]) dropped with chance `rate`."""
    if rate <= 0 or len(row) <= 3:
        return row
    keep = rng.random(len(row) - 2) >= rate
    kept = [t for t, k in zip(row[1:-1], keep) if k]
    return [row[0], *(kept or row[1:2]), row[-1]]


def mask_tokens(ids: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: 15% of the real tokens predicted; of those 80% [MASK], 10% a random
    word piece (up to the batch's largest id), 10% kept."""
    special = (ids == PAD) | (ids == CLS) | (ids == SEP)
    chosen = (torch.rand(ids.shape, generator=gen) < 0.15) & ~special
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    roll = torch.rand(ids.shape, generator=gen)
    inputs = torch.where(chosen & (roll < 0.8), torch.full_like(ids, MASK), ids)
    random_ids = torch.randint(len(SPECIALS), int(ids.max()) + 1, ids.shape, generator=gen)
    inputs = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, inputs)
    return inputs, labels


def train(
    model: torch.nn.Module,
    rows: list[list[int]],
    labels: np.ndarray | None,
    *,
    epochs: float,
    lr: float,
    weight_decay: float,
    batch_size: int,
    seed: int,
    label_smoothing: float = 0.0,
    token_dropout: float = 0.0,
) -> None:
    """AdamW, linear warm-up, cosine decay to zero; masked-LM when `labels` is None."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    steps = max(1, math.ceil(epochs * len(rows) / batch_size))
    warmup = max(1, steps // 20)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / steps)))
    )
    model.train()
    batches: list[list[int]] = []
    for _ in range(steps):
        if not batches:
            batches = length_batches(rows, batch_size, gen)
        idx = batches.pop()
        ids, attention = pad([drop_tokens(rows[i], token_dropout, rng) for i in idx])
        if labels is None:
            inputs, targets = mask_tokens(ids, gen)
            loss = model(input_ids=inputs, attention_mask=attention, labels=targets).loss
        else:
            logits = model(input_ids=ids, attention_mask=attention).logits
            loss = F.cross_entropy(
                logits, torch.from_numpy(labels[idx]), label_smoothing=label_smoothing
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()


@torch.no_grad()
def correct(
    model: torch.nn.Module, rows: list[list[int]], labels: np.ndarray, batch_size: int = 256
) -> np.ndarray:
    """Per-example top-1 correctness (bool), in batches of rows of similar length."""
    model.eval()
    order = np.argsort([len(r) for r in rows], kind="stable")
    predicted = np.empty(len(rows), dtype=np.int64)
    for start in range(0, len(rows), batch_size):
        batch = order[start : start + batch_size]
        ids, attention = pad([rows[i] for i in batch])
        predicted[batch] = model(input_ids=ids, attention_mask=attention).logits.argmax(-1)
    return predicted == labels


def draw_hyperparameters(config: TextZooConfig, index: int) -> dict:
    rng = np.random.default_rng([config.seed, index])
    lo, hi = config.finetune_lr
    return {
        "lr": float(math.exp(rng.uniform(math.log(lo), math.log(hi)))),
        "weight_decay": float(rng.uniform(*config.finetune_weight_decay)),
        "label_smoothing": float(rng.uniform(*config.finetune_label_smoothing)),
        "epochs": float(rng.uniform(*config.finetune_epochs)),
        "token_dropout": float(rng.uniform(*config.finetune_token_dropout)),
        "seed": int(rng.integers(2**31)),
    }


def _subset(text_set: fortunes.TextSet, size: int | None, seed: int) -> fortunes.TextSet:
    """`size` rows of the set drawn by `seed`, in their order (all rows when None)."""
    if size is None or size >= len(text_set):
        return text_set
    keep = np.sort(np.random.default_rng(seed).choice(len(text_set), size, replace=False))
    return fortunes.TextSet(text_set.name, [text_set.texts[i] for i in keep], text_set.labels[keep])


def write_text_eval_sets(out: Path, config: TextZooConfig, root: Path | None = None) -> dict:
    """val, id and the shifted sets as Arrow files under out/data; their manifest entries,
    each with its content sha256."""
    (out / "data").mkdir(parents=True, exist_ok=True)
    entries = {}
    for s in fortunes.build_text_eval_sets(root):
        s = _subset(s, config.eval_size, fortunes.SPLIT_SEED)
        path = out / "data" / f"{s.name}.arrow"
        fortunes.write_text_set(s, path)
        entries[s.name] = {
            "file": str(path.relative_to(out)),
            "rows": len(s),
            "sha256": fortunes.text_content_sha256(s.texts, s.labels),
        }
    return entries


def build_text_zoo(out: Path, config: TextZooConfig, root: Path | None = None) -> Path:
    """Build a text zoo in `out` (a finished one is kept). Not bitwise repeatable: the
    tokenizer trainer breaks ties at the vocabulary's cut in no fixed order (a word piece
    or two differ between runs), and CPU float sums differ across CPU models."""
    from transformers import BertForMaskedLM, BertForSequenceClassification

    out = Path(out)
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("config") != json.loads(json.dumps(config.to_dict())):
            raise RaysoupError(
                f"{out} holds a text zoo built with a different config; choose "
                "another --out or delete it"
            )
        return out
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        t0 = time.time()
        out.mkdir(parents=True, exist_ok=True)
        train_set = _subset(fortunes.topic_splits(root)["train"], config.train_size, config.seed)
        eval_files = write_text_eval_sets(out, config, root)
        val = fortunes.read_text_set(out / eval_files["val"]["file"])

        tokenizer = train_tokenizer(train_set.texts, config)
        rows, labels = encode(tokenizer, train_set.texts), train_set.labels
        val_rows = encode(tokenizer, val.texts)
        model_config = bert_config(config, len(tokenizer))

        def val_acc(model) -> float:
            return float(correct(model, val_rows, val.labels).mean())

        # Pretraining. Its topic phase sees one part of the rows; the fine-tunes the rest.
        pre_order = np.random.default_rng(config.pretrain_seed).permutation(len(rows))
        n_pre = round(config.pretrain_share * len(rows))
        pre_rows, ft_pool = np.sort(pre_order[:n_pre]), np.sort(pre_order[n_pre:])
        torch.manual_seed(config.pretrain_seed)
        mlm = BertForMaskedLM(model_config)
        train(
            mlm,
            rows,
            None,
            epochs=config.mlm_epochs,
            lr=config.mlm_lr,
            weight_decay=0.01,
            batch_size=config.batch_size,
            seed=config.pretrain_seed,
        )
        logger.info(f"[text zoo] masked-LM pretraining done ({time.time() - t0:.0f}s)")
        torch.manual_seed(config.pretrain_seed)
        model = BertForSequenceClassification(model_config)
        model.bert.load_state_dict(mlm.bert.state_dict(), strict=False)  # no pooler in MLM
        pre_hp = {
            "mlm_epochs": config.mlm_epochs,
            "mlm_lr": config.mlm_lr,
            "epochs": config.pretrain_epochs,
            "lr": config.pretrain_lr,
            "weight_decay": 0.01,
            "rows": len(pre_rows),
            "seed": config.pretrain_seed,
        }
        train(
            model,
            [rows[i] for i in pre_rows],
            labels[pre_rows],
            epochs=config.pretrain_epochs,
            lr=config.pretrain_lr,
            weight_decay=0.01,
            batch_size=config.batch_size,
            seed=config.pretrain_seed,
        )
        model.save_pretrained(out / "pretrained")
        tokenizer.save_pretrained(out / "pretrained")
        pretrained = {
            "file": "pretrained",
            "hyperparameters": pre_hp,
            "val_acc": val_acc(model),
            "sha256": file_sha256(out / "pretrained" / WEIGHTS),
        }
        logger.info(
            f"[text zoo] pretrained: val {pretrained['val_acc']:.4f} ({time.time() - t0:.0f}s)"
        )
        base_state = {k: v.clone() for k, v in model.state_dict().items()}

        ingredients = []
        for i in range(config.ingredients):
            hp = draw_hyperparameters(config, i)
            mine = np.sort(
                np.random.default_rng(hp["seed"]).choice(
                    ft_pool, round(config.finetune_data_fraction * len(ft_pool)), replace=False
                )
            )
            model.load_state_dict(base_state)
            train(
                model,
                [rows[j] for j in mine],
                labels[mine],
                epochs=hp["epochs"],
                lr=hp["lr"],
                weight_decay=hp["weight_decay"],
                batch_size=config.batch_size,
                seed=hp["seed"],
                label_smoothing=hp["label_smoothing"],
                token_dropout=hp["token_dropout"],
            )
            name = f"ft-{i:02d}"
            model.save_pretrained(out / "ingredients" / name)
            ingredients.append(
                {
                    "name": name,
                    "file": f"ingredients/{name}",
                    "hyperparameters": {**hp, "rows": len(mine)},
                    "val_acc": val_acc(model),
                    "sha256": file_sha256(out / "ingredients" / name / WEIGHTS),
                }
            )
            logger.info(
                f"[text zoo] {name}: val {ingredients[-1]['val_acc']:.4f} ({time.time() - t0:.0f}s)"
            )

        manifest = {
            "format": TEXT_ZOO_FORMAT,
            "config": config.to_dict(),
            "model": {
                "family": "transformers",
                "task": "sequence-classification",
                "path": "pretrained",
                "num_classes": len(fortunes.CLASSES),
                "max_length": config.max_length,
            },  # as trained: evaluate so too
            "classes": list(fortunes.CLASSES),
            "pretrained": pretrained,
            "ingredients": ingredients,
            "eval_sets": eval_files,
            "build_seconds": round(time.time() - t0, 1),
        }
        manifest["calibration"] = calibrate(out, manifest)
        write_json(manifest_path, manifest)
        return out
    finally:
        torch.set_num_threads(threads)


def _load(path: Path):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(path)


def calibrate(zoo: Path, manifest: dict) -> dict:
    """Accuracy per set of the pretrained model, the best ingredient (by val) and the
    uniform soup, and the soup's paired difference to the best ingredient (stats.compare):
    a stand-alone check that the zoo is worth souping (the run path evaluates through the
    model families)."""
    from transformers import AutoTokenizer

    zoo = Path(zoo)
    tokenizer = AutoTokenizer.from_pretrained(zoo / manifest["model"]["path"])
    sets = {
        name: fortunes.read_text_set(zoo / e["file"]) for name, e in manifest["eval_sets"].items()
    }
    encoded = {name: (encode(tokenizer, s.texts), s.labels) for name, s in sets.items()}
    best = max(manifest["ingredients"], key=lambda e: e["val_acc"])
    states = [_load(zoo / e["file"]).state_dict() for e in manifest["ingredients"]]
    soup = _load(zoo / manifest["pretrained"]["file"])
    soup.load_state_dict(
        {
            k: torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype)
            for k, v in states[0].items()
        }
    )
    best_label = f"best ingredient ({best['name']})"
    models = {
        "pretrained": _load(zoo / manifest["pretrained"]["file"]),
        best_label: _load(zoo / best["file"]),
        "uniform soup": soup,
    }
    hits = {
        label: {name: correct(m, *encoded[name]) for name in sets} for label, m in models.items()
    }
    out = {
        label: {name: float(h.mean()) for name, h in per_set.items()}
        for label, per_set in hits.items()
    }
    shifted = [name for name in sets if name not in ("val", "id")]
    out["uniform soup - best ingredient"] = stats.compare(
        hits["uniform soup"], hits[best_label], shifted
    )
    return out


def install_shipped_text_zoo(
    out: Path, shipped: Path = SHIPPED_TEXT_ZOO, root: Path | None = None
) -> Path:
    """The shipped text zoo in `out`: weights and tokenizer copied, evaluation sets made from
    the fortunes package and checked against the shipped manifest's sha256."""
    out = Path(out)
    if (out / "manifest.json").is_file():
        return out
    manifest = json.loads((shipped / "manifest.json").read_text())
    with atomic(out) as tmp:
        shutil.copytree(shipped, tmp, ignore=shutil.ignore_patterns("*.tmp", "__pycache__"))
        where = root or fortunes.fortunes_dir()
        logger.info(f"[text zoo] making the evaluation sets from the fortunes in {where}")
        made = write_text_eval_sets(tmp, TextZooConfig.from_dict(manifest["config"]), root)
        for name, entry in manifest["eval_sets"].items():
            got = made.get(name, {}).get("sha256", "missing")
            if got != entry["sha256"]:
                raise RaysoupError(
                    f"text set {name!r} made on this machine differs from the shipped zoo's "
                    f"(sha256 {got[:16]}... vs {entry['sha256'][:16]}...): is {where} Debian's "
                    f"`fortunes` package (1:1.99.1-7.3)?"
                )
    return out


def with_overrides(config: TextZooConfig, **overrides) -> TextZooConfig:
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})
