"""Metrics as a user writes them (`metric = "tests.user_metrics:soft"`), and broken ones."""

import numpy as np


def soft(logits, labels):
    """The softmax probability of the true class: a score in [0, 1], rarely 0 or 1."""
    return logits.softmax(dim=1).gather(1, labels[:, None])[:, 0]


def top2(logits, labels):
    """Right when the label is among the two highest logits: 0/1 scores, as a numpy array."""
    return (logits.topk(2, dim=1).indices == labels[:, None]).any(dim=1).cpu().numpy()


def one_per_class(logits, labels):
    return logits.softmax(dim=1)  # (N, classes), not one score per example


def logit_of_label(logits, labels):
    return logits.gather(1, labels[:, None])[:, 0]  # unbounded


def raises(logits, labels):
    raise ValueError("a bug in the metric")


NOT_A_FUNCTION = np.ones(3)
