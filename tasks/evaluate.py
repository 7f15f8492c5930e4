"""Evaluate a registered classifier: metrics people can trust, pictures of its mistakes,
calibration, the dataset's label problems, and the champion/challenger promotion.

Pure functions first (arrays in, numbers / PNG bytes / YAML out), then the storage-facing
steps, then thin Prefect tasks:

* **headline metrics** (:func:`headline_metrics`): top-1, top-5, macro-F1 and
  scikit-learn's ``classification_report`` per class; :func:`multilabel_metrics` for a
  multi-label head (per-label precision/recall/F1, binary and subset accuracy);
* **confusion** (:func:`confusion_png`): the row-normalised confusion matrix, reduced to
  the sub-matrix of the most-confused classes when there are more than
  ``evaluate.confusion_max_classes`` (readable at 500 classes); :func:`per_class_accuracy_png`;
* **most-confused pairs** (:func:`most_confused_pairs`) with a contact sheet of the
  misclassified test crops of each (:func:`tasks.report.contact_sheet`);
* **calibration**: :func:`fit_temperature` (one scalar ``T`` minimising the validation
  NLL of ``softmax(logits / T)``, or of the sigmoids for multi-label),
  :func:`expected_calibration_error` and :func:`reliability_png`, before and after;
* **suggested merges** (:func:`suggest_merges`): cleanlab's ``find_overlapping_classes`` on
  out-of-sample probabilities, kept only where the confusion goes both ways, written as a
  ready ``classes.merge_map`` YAML snippet (:func:`merge_map_yaml`);
* **likely label errors** (:func:`rank_label_issues`): cleanlab's ``find_label_issues``,
  ranked by self-confidence, with a thumbnail gallery.

Out-of-sample probabilities are the model's on the validation and test splits (it never
trained on them), or, for a model trained with ``--cv K``, the out-of-fold predictions of
every train and val row stored with the version (:func:`load_out_of_fold`) plus test:
the finders then see the whole dataset, and the report says which. :func:`evaluate_version` runs a registered version (through
:class:`models.classifier.ClassifierPredictor`) on a dataset export (``tasks.export.open_export``)
and :func:`write_evaluation` stores everything under
``models/classifier/<version>/eval/<dataset version>/`` (:func:`carflow.keys.eval_name`),
fits the temperature into the version's ``config.json`` and ``meta.json``, and records the
headline numbers with a fingerprint of the test split. :func:`promote_if_better` moves
``latest`` only when the candidate's test top-1 is at least the champion's on the *same*
test split (the champion is re-evaluated on it when needed), or with ``force``.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from prefect import task

from carflow import keys
from carflow.errors import UserError
from carflow.registry import Decision, Registry, Version, now_iso
from carflow.settings import EvaluateSettings, as_settings
from carflow.storage import Storage, open_storage
from tasks.report import contact_sheet
from tasks.shards import gpu_slot

MULTICLASS = "multiclass"
MULTILABEL = "multilabel"


# ---------------------------------------------------------------------------------------
# Probabilities
# ---------------------------------------------------------------------------------------
def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def sigmoid(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64) / float(temperature)))


def probabilities(logits: np.ndarray, temperature: float = 1.0, task: str = MULTICLASS) -> np.ndarray:
    return sigmoid(logits, temperature) if task == MULTILABEL else softmax(logits, temperature)


# ---------------------------------------------------------------------------------------
# Headline metrics
# ---------------------------------------------------------------------------------------
def headline_metrics(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """top-1, top-5 (top-k with k = min(5, classes)), macro-F1 over the classes present in
    the test split, and scikit-learn's ``classification_report`` (dict and text)."""
    from sklearn.metrics import classification_report, f1_score, top_k_accuracy_score

    y = np.asarray(y_true, dtype=np.int64)
    n_classes = len(classes)
    if len(y) == 0:
        return {"n": 0, "top1": None, "top5": None, "macro_f1": None, "report": {}, "report_text": ""}
    pred = probs.argmax(axis=1)
    labels = np.arange(n_classes)
    present = np.unique(y)
    k = min(5, n_classes)
    top5 = (float(top_k_accuracy_score(y, probs, k=k, labels=labels)) if n_classes > 2
            else float((pred == y).mean()) if k < 2 else 1.0)
    report = classification_report(y, pred, labels=labels, target_names=list(classes), output_dict=True,
                                   zero_division=0)
    text = classification_report(y, pred, labels=present, target_names=[classes[i] for i in present],
                                 zero_division=0, digits=3)
    return {
        "n": int(len(y)),
        "top1": float((pred == y).mean()),
        "top5": top5,
        "top_k": k,
        "macro_f1": float(f1_score(y, pred, labels=present, average="macro", zero_division=0)),
        "classes_in_test": int(len(present)),
        "report": report,
        "report_text": text,
    }


def multilabel_metrics(y_true: np.ndarray, probs: np.ndarray, label_names: Sequence[str],
                       threshold: float = 0.5) -> dict[str, Any]:
    """Per-label precision/recall/F1 (``classification_report`` on the indicator matrix),
    binary accuracy (every label decision), subset accuracy (every label of an image right)
    and micro/macro F1."""
    from sklearn.metrics import classification_report, f1_score

    y = np.asarray(y_true, dtype=np.int64)
    if len(y) == 0:
        return {"n": 0, "binary_accuracy": None, "subset_accuracy": None, "report": {}, "report_text": ""}
    pred = (probs >= threshold).astype(np.int64)
    return {
        "n": int(len(y)),
        "threshold": threshold,
        "binary_accuracy": float((pred == y).mean()),
        "subset_accuracy": float((pred == y).all(axis=1).mean()),
        "micro_f1": float(f1_score(y, pred, average="micro", zero_division=0)),
        "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0)),
        "report": classification_report(y, pred, target_names=list(label_names), output_dict=True, zero_division=0),
        "report_text": classification_report(y, pred, target_names=list(label_names), zero_division=0, digits=3),
    }


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(y_true, y_pred, labels=np.arange(n_classes))


def per_class_accuracy(cm: np.ndarray) -> np.ndarray:
    """Recall per class (NaN for a class absent from the test split)."""
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)


def most_confused_pairs(cm: np.ndarray, classes: Sequence[str], top: int = 10) -> list[dict[str, Any]]:
    """Off-diagonal cells by count (then rate): ``true`` predicted as ``predicted``, with the
    count, the share of ``true``'s test images (``rate``) and the reverse count."""
    off = cm.copy()
    np.fill_diagonal(off, 0)
    support = cm.sum(axis=1)
    idx = np.argwhere(off > 0)
    if not len(idx):
        return []
    counts = off[idx[:, 0], idx[:, 1]]
    rates = counts / np.maximum(support[idx[:, 0]], 1)
    order = np.lexsort((-rates, -counts))[:top]
    return [{"true": classes[int(a)], "predicted": classes[int(b)], "true_index": int(a), "predicted_index": int(b),
             "count": int(off[a, b]), "rate": float(off[a, b] / max(support[a], 1)), "reverse_count": int(off[b, a])}
            for a, b in idx[order]]


# ---------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------
def _confidences(probs: np.ndarray, y: np.ndarray, task: str) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, correct) pairs: the top class for multi-class, every label decision
    for multi-label."""
    if task == MULTILABEL:
        p = probs.ravel()
        pred = p >= 0.5
        return np.where(pred, p, 1 - p), (pred == (np.asarray(y).ravel() > 0))
    return probs.max(axis=1), probs.argmax(axis=1) == np.asarray(y)


def reliability_bins(probs: np.ndarray, y: np.ndarray, n_bins: int = 15, task: str = MULTICLASS) -> dict[str, list]:
    """Equal-width confidence bins: per bin the mean confidence, the accuracy and the count."""
    conf, correct = _confidences(probs, y, task)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    conf_sum = np.bincount(which, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(which, weights=correct.astype(np.float64), minlength=n_bins)
    nz = np.maximum(count, 1)
    return {"edges": edges.tolist(), "count": count.tolist(), "confidence": (conf_sum / nz).tolist(),
            "accuracy": (acc_sum / nz).tolist()}


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, n_bins: int = 15, task: str = MULTICLASS) -> float:
    """ECE: the count-weighted mean |accuracy − confidence| over equal-width bins."""
    b = reliability_bins(probs, y, n_bins, task)
    count = np.asarray(b["count"], dtype=np.float64)
    if count.sum() == 0:
        return float("nan")
    gap = np.abs(np.asarray(b["accuracy"]) - np.asarray(b["confidence"]))
    return float((count * gap).sum() / count.sum())


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0, task: str = MULTICLASS) -> float:
    """Mean negative log-likelihood of ``y`` under ``logits / temperature``."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    if task == MULTILABEL:
        t = np.asarray(y, dtype=np.float64)
        # log(1 + exp(-|z|)) + max(z, 0) - z * t  (stable BCE with logits)
        return float(np.mean(np.logaddexp(0, -np.abs(z)) + np.maximum(z, 0) - z * t))
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(z)), np.asarray(y, dtype=np.int64)].mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray, task: str = MULTICLASS,
                    bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """Temperature scaling (Guo et al. 2017): the ``T`` that minimises the NLL of
    ``logits / T`` on held-out data, searched on log T (bounded scalar minimisation).
    Accuracy does not change (the argmax is the same); 1.0 when there is no data."""
    from scipy.optimize import minimize_scalar

    if len(logits) == 0:
        return 1.0
    res = minimize_scalar(lambda lt: nll(logits, y, float(np.exp(lt)), task),
                          bounds=(np.log(bounds[0]), np.log(bounds[1])), method="bounded",
                          options={"xatol": 1e-4})
    t = float(np.exp(res.x))
    # never worse than leaving it alone
    return t if nll(logits, y, t, task) <= nll(logits, y, 1.0, task) else 1.0


# ---------------------------------------------------------------------------------------
# cleanlab: suggested merges and likely label errors
# ---------------------------------------------------------------------------------------
def _present(labels: np.ndarray, pred_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """cleanlab wants every class to occur in ``labels``: keep the present classes'
    columns (renormalised) and relabel; returns (labels, probs, present class indices)."""
    present = np.unique(labels)
    remap = np.full(pred_probs.shape[1], -1)
    remap[present] = np.arange(len(present))
    p = pred_probs[:, present].astype(np.float64)
    p = p / np.maximum(p.sum(axis=1, keepdims=True), 1e-12)
    return remap[labels], p, present


def suggest_merges(labels: np.ndarray, pred_probs: np.ndarray, classes: Sequence[str],
                   min_examples: int = 2, min_rate: float = 0.1) -> list[dict[str, Any]]:
    """Pairs of classes to merge: cleanlab's ``find_overlapping_classes`` on out-of-sample
    probabilities (symmetric joint probability, highest first), kept where the confusion goes
    both ways: in cleanlab's confident joint, at least ``min_examples`` images and
    ``min_rate`` of the class's images labelled ``a`` look like ``b``, *and* the same from
    ``b`` to ``a``. A one-way flow is a labelling error, not a look-alike pair
    (:func:`rank_label_issues` finds those)."""
    from cleanlab.count import compute_confident_joint
    from cleanlab.dataset import find_overlapping_classes

    y = np.asarray(labels, dtype=np.int64)
    if len(y) == 0:
        return []
    y2, p2, present = _present(y, pred_probs)
    if len(present) < 2:
        return []
    cj = compute_confident_joint(y2, p2)  # [given label, true label] counts
    given = np.bincount(y2, minlength=len(present))
    df = find_overlapping_classes(labels=y2, pred_probs=p2, asymmetric=False)
    out = []
    for a, b, n_overlap, joint in df[["Class Index A", "Class Index B", "Num Overlapping Examples",
                                      "Joint Probability"]].itertuples(index=False):
        a, b = int(a), int(b)
        ab, ba = int(cj[a, b]), int(cj[b, a])
        rate_ab, rate_ba = ab / max(given[a], 1), ba / max(given[b], 1)
        if min(ab, ba) < min_examples or min(rate_ab, rate_ba) < min_rate or float(joint) <= 0:
            continue
        out.append({"classes": [classes[int(present[a])], classes[int(present[b])]],
                    "joint_probability": float(joint), "overlapping_examples": int(n_overlap),
                    "given_a_looks_b": ab, "given_b_looks_a": ba,
                    "rate_a_to_b": float(rate_ab), "rate_b_to_a": float(rate_ba)})
    return out


def merge_map_yaml(suggestions: Sequence[Mapping[str, Any]], counts: Mapping[str, int] | None = None,
                   top: int | None = None) -> str:
    """A ready ``classes.merge_map`` (``target: [source, ...]``): suggested pairs joined
    into groups (a–b and b–c is one group), each merged into its largest class (by
    ``counts``, then name). Comments give each pair's score. Empty map: ``{}``."""
    import yaml

    chosen = list(suggestions)[:top] if top else list(suggestions)
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for s in chosen:
        a, b = s["classes"]
        parent[find(a)] = find(b)
    groups: dict[str, list[str]] = {}
    for c in list(parent):
        groups.setdefault(find(c), []).append(c)
    counts = counts or {}
    mapping = {}
    for members in groups.values():
        members.sort(key=lambda c: (-int(counts.get(c, 0)), c))
        mapping[members[0]] = sorted(members[1:])
    lines = ["# classes.merge_map suggested by `carflow evaluate` (cleanlab find_overlapping_classes,",
             "# classes confused in both directions). Review, then point classes.merge_map at this file",
             "# (CARFLOW_CLASSES__MERGE_MAP) and run `carflow dataset`."]
    lines += [f"#   {s['classes'][0]} <-> {s['classes'][1]}: joint probability {s['joint_probability']:.4f}, "
              f"{s['given_a_looks_b']} + {s['given_b_looks_a']} examples" for s in chosen]
    body = yaml.safe_dump(dict(sorted(mapping.items())), sort_keys=True, default_flow_style=False) if mapping else "{}\n"
    return "\n".join(lines) + "\n" + body


def rank_label_issues(labels: np.ndarray | Sequence[Sequence[int]], pred_probs: np.ndarray,
                      multi_label: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """cleanlab's ``find_label_issues`` on out-of-sample probabilities: indices of the likely
    label errors, most likely first (ranked by self-confidence), and every example's
    label-quality score (lower = more suspect). ``n_jobs=1``: cleanlab's default forks a
    ``multiprocessing`` pool, and a fork of a process holding TensorFlow/OpenVINO threads
    can deadlock (it hung ``python -m flows.train`` after training); the results do not
    depend on it and the work is milliseconds."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    if multi_label:
        from cleanlab.multilabel_classification.rank import get_label_quality_scores as ml_scores

        lab = [list(map(int, x)) for x in labels]  # type: ignore[union-attr]
        if not lab:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        idx = find_label_issues(lab, pred_probs, multi_label=True, return_indices_ranked_by="self_confidence",
                                n_jobs=1)
        return np.asarray(idx, dtype=np.int64), np.asarray(ml_scores(lab, pred_probs))
    y = np.asarray(labels, dtype=np.int64)
    if len(y) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    y2, p2, present = _present(y, pred_probs)
    if len(present) < 2:
        return np.zeros(0, dtype=np.int64), np.ones(len(y))
    idx = find_label_issues(y2, p2, return_indices_ranked_by="self_confidence", n_jobs=1)
    return np.asarray(idx, dtype=np.int64), np.asarray(get_label_quality_scores(y2, p2))


# ---------------------------------------------------------------------------------------
# Charts (PNG bytes)
# ---------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _plt().close(fig)
    return buf.getvalue()


def confused_subset(cm: np.ndarray, max_classes: int) -> np.ndarray:
    """The classes of the most-confused sub-matrix: classes taken pair by pair from the
    largest off-diagonal cells until ``max_classes``; all classes when they fit."""
    n = cm.shape[0]
    if n <= max_classes:
        return np.arange(n)
    off = cm.astype(np.float64).copy()
    np.fill_diagonal(off, 0)
    off = off / np.maximum(cm.sum(axis=1, keepdims=True), 1) + off  # count first, rate breaks ties
    chosen: list[int] = []
    for flat in np.argsort(-off, axis=None):
        a, b = divmod(int(flat), n)
        if off[a, b] <= 0:
            break
        for c in (a, b):
            if c not in chosen and len(chosen) < max_classes:
                chosen.append(c)
        if len(chosen) >= max_classes:
            break
    if len(chosen) < max_classes:  # few confusions: fill with the least accurate classes
        acc = np.nan_to_num(per_class_accuracy(cm), nan=2.0)
        chosen += [int(c) for c in np.argsort(acc, kind="stable") if int(c) not in chosen][: max_classes - len(chosen)]
    return np.asarray(sorted(chosen))


def confusion_png(cm: np.ndarray, classes: Sequence[str], max_classes: int = 40, title: str = "") -> bytes:
    """Row-normalised confusion matrix (each row: where that class's test images went).
    Above ``max_classes`` classes, the sub-matrix of the most-confused classes (rows still
    normalised by the class's full test count), so the picture stays readable at 500."""
    plt = _plt()
    keep = confused_subset(cm, max_classes)
    rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    sub = rates[np.ix_(keep, keep)]
    k = len(keep)
    side = min(16.0, max(5.0, 0.32 * k + 3))
    fig, ax = plt.subplots(figsize=(side + 1.2, side), dpi=100)
    im = ax.imshow(sub, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    names = [str(classes[i]) for i in keep]
    fs = 8 if k <= 25 else 6
    ax.set_xticks(range(k), names, rotation=90, fontsize=fs)
    ax.set_yticks(range(k), names, fontsize=fs)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if sub[i, j] >= 0.005:
                    ax.text(j, i, f"{sub[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if sub[i, j] > 0.5 else "black")
    what = f"{k} most-confused of {cm.shape[0]} classes" if k < cm.shape[0] else f"{k} classes"
    ax.set_title(title or f"confusion matrix, row-normalised ({what})")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return _png(fig)


def per_class_accuracy_png(cm: np.ndarray, classes: Sequence[str], max_bars: int = 50) -> bytes:
    """Horizontal bars of per-class accuracy, worst first (the ``max_bars`` worst classes
    when there are more), with the mean as a line."""
    plt = _plt()
    acc = per_class_accuracy(cm)
    present = np.where(~np.isnan(acc))[0]
    order = present[np.argsort(acc[present], kind="stable")][:max_bars]
    k = max(1, len(order))
    fig, ax = plt.subplots(figsize=(8, min(18.0, 0.25 * k + 1.5)), dpi=100)
    ax.barh(range(len(order)), acc[order], color="tab:blue")
    ax.set_yticks(range(len(order)), [str(classes[i]) for i in order], fontsize=7 if k > 30 else 9)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    if len(present):
        ax.axvline(float(np.nanmean(acc)), color="tab:red", linestyle="--", label=f"mean {np.nanmean(acc):.3f}")
        ax.legend(loc="lower right")
    shown = f"{len(order)} worst of {len(present)}" if len(order) < len(present) else f"{len(present)} classes"
    ax.set_title(f"per-class accuracy on test ({shown})")
    ax.set_xlabel("accuracy (recall)")
    fig.tight_layout()
    return _png(fig)


def reliability_png(before: Mapping[str, list], after: Mapping[str, list] | None = None,
                    ece_before: float | None = None, ece_after: float | None = None,
                    temperature: float | None = None) -> bytes:
    """Reliability diagram: accuracy against confidence per bin, before (and after)
    temperature scaling, with the diagonal of perfect calibration and the bin counts."""
    plt = _plt()
    fig, (ax, axc) = plt.subplots(2, 1, figsize=(6, 7), dpi=100, gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect")
    edges = np.asarray(before["edges"])
    mids = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    for b, name, ece, color in ((before, "T = 1", ece_before, "tab:red"),
                                (after, f"T = {temperature:.2f}" if temperature else "calibrated", ece_after, "tab:blue")):
        if b is None:
            continue
        cnt = np.asarray(b["count"])
        m = cnt > 0
        label = name + (f" (ECE {ece:.3f})" if ece is not None else "")
        ax.plot(np.asarray(b["confidence"])[m], np.asarray(b["accuracy"])[m], marker="o", color=color, label=label)
        axc.bar(mids, cnt, width=width * (0.45 if after is not None else 0.9), alpha=0.6, color=color,
                align="edge" if (after is not None and b is after) else "center")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title("reliability diagram (test split)")
    ax.legend(loc="upper left")
    axc.set_xlabel("confidence")
    axc.set_ylabel("images")
    fig.tight_layout()
    return _png(fig)


# ---------------------------------------------------------------------------------------
# Predictions of one version on one dataset
# ---------------------------------------------------------------------------------------
class Predictor(Protocol):
    """What evaluation needs of :class:`models.classifier.ClassifierPredictor`."""

    version: str
    labels: list[str]
    task: str
    temperature: float

    def logits(self, images: Any) -> np.ndarray: ...


@dataclass
class Predictions:
    """Logits of one model on one split, aligned with the examples' ids and labels."""

    split: str
    logits: np.ndarray  # [N, C]
    y: np.ndarray  # [N] class index in the model's labels, or [N, C] multi-hot
    image_ids: list[str] = field(default_factory=list)
    listing_ids: list[str] = field(default_factory=list)
    #: each example's class (its label text for multi-label)
    label_texts: list[str] = field(default_factory=list)
    #: where each example's image is, to fetch a few again for galleries: (shard path, position)
    sources: list[tuple[str, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.logits)


def split_fingerprint(preds: Predictions) -> str:
    """Identity of an evaluated split: sha256 of its sorted ``image_id:label`` lines."""
    lines = sorted(f"{i}:{t}" for i, t in zip(preds.image_ids, preds.label_texts))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def _decode(jpeg: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(jpeg)) as im:
        return np.asarray(im.convert("RGB"))


def _split_examples(index: Any, split: str, labels: Sequence[str], multilabel: bool, skipped: dict[str, int],
                    iter_examples: Callable[[str], Iterable[Mapping[str, Any]]]
                    ) -> Iterable[tuple[Mapping[str, Any], Any, str, tuple[str, int]]]:
    """(example, target, class text, (shard path, position)) of every example of ``split``
    the metrics may see: examples excluded by the dataset version, or whose class the
    model does not know, are counted in ``skipped``."""
    where = {c: i for i, c in enumerate(labels)}
    excluded = set(getattr(index, "excluded", ()) or ())
    classes = list(getattr(index, "classes", []) or [])
    for path in index.files(split):
        for pos, ex in enumerate(iter_examples(path)):
            text = str(ex.get("label_text") or "")
            if ex.get("image_id") in excluded:
                skipped["excluded"] += 1
                continue
            if multilabel:
                target = np.zeros(len(labels), dtype=np.int64)
                for a in ex.get("attributes") or []:
                    if a in where:
                        target[where[a]] = 1
                y: Any = target
            else:
                # the dataset version's class of this image (a per-image override wins over the text)
                k = index.label_of(ex) if hasattr(index, "label_of") else index.label_index(text)
                if k is None:
                    skipped["excluded"] += 1
                    continue
                text = classes[k] if classes else text
                if text not in where:
                    skipped["unknown_class"] += 1
                    continue
                y = where[text]
            yield ex, y, text, (str(path), pos)


def _predictions(split: str, outs: list[np.ndarray], ys: list[Any], meta: list[tuple], n_out: int,
                 multilabel: bool) -> Predictions:
    logits = np.concatenate(outs) if outs else np.zeros((0, n_out), dtype=np.float32)
    if multilabel:
        y_arr = np.stack(ys) if ys else np.zeros((0, n_out), dtype=np.int64)
    else:
        y_arr = np.asarray(ys, dtype=np.int64)
    ids, listings, texts, sources = (list(c) for c in zip(*meta)) if meta else ([], [], [], [])
    return Predictions(split, logits, y_arr, ids, listings, texts, sources)


def predict_split(predictor: Predictor, index: Any, split: str, batch_size: int = 64,
                  iter_examples: Callable[[str], Iterable[Mapping[str, Any]]] | None = None) -> tuple[Predictions, dict[str, int]]:
    """Run ``predictor`` over one split of a dataset export (``index``: ``tasks.export.ExportIndex``).
    Examples excluded by the dataset version, or whose class the model does not know, are
    counted (returned), never fed to the metrics."""
    if iter_examples is None:
        from tasks.export import iter_examples
    labels = list(predictor.labels)
    multilabel = getattr(predictor, "task", MULTICLASS) == MULTILABEL
    skipped = {"excluded": 0, "unknown_class": 0, "undecodable": 0}
    out_logits: list[np.ndarray] = []
    ys: list[Any] = []
    meta: list[tuple] = []
    batch: list[np.ndarray] = []

    def flush() -> None:
        if batch:
            # export JPEGs are never upscaled: sizes differ, the predictor resizes
            out_logits.append(np.asarray(predictor.logits(list(batch)), dtype=np.float32))
            batch.clear()

    for ex, y, text, source in _split_examples(index, split, labels, multilabel, skipped, iter_examples):
        try:
            img = _decode(ex["image"])
        except Exception:  # noqa: BLE001 - a broken example is counted, not fatal
            skipped["undecodable"] += 1
            continue
        batch.append(img)
        ys.append(y)
        meta.append((str(ex.get("image_id") or ""), str(ex.get("listing_id") or ""), text, source))
        if len(batch) >= batch_size:
            flush()
    flush()
    return _predictions(split, out_logits, ys, meta, len(labels), multilabel), skipped


def load_out_of_fold(version: Version) -> dict[str, Any] | None:
    """A CV run's out-of-fold logits (``models.classifier.OOF_FILE``, written by
    ``tasks.train.cross_validate``): ``image_ids``, ``splits``, ``folds``, ``logits``;
    None when the version has none."""
    from models.classifier import OOF_FILE

    if not version.exists(OOF_FILE):
        return None
    with np.load(io.BytesIO(version.get(OOF_FILE)), allow_pickle=False) as z:
        return {"image_ids": [str(i) for i in z["image_ids"]], "splits": [str(s) for s in z["splits"]],
                "folds": z["folds"], "logits": z["logits"]}


def out_of_fold_split(oof: Mapping[str, Any], index: Any, split: str, labels: Sequence[str], task: str = MULTICLASS,
                      iter_examples: Callable[[str], Iterable[Mapping[str, Any]]] | None = None) -> Predictions:
    """The out-of-fold logits of ``split``'s examples, aligned with the export like
    :func:`predict_split` (labels, ids, sources for galleries), without decoding an image.
    Examples without an out-of-fold row are left out."""
    if iter_examples is None:
        from tasks.export import iter_examples
    row = {i: k for k, (i, s) in enumerate(zip(oof["image_ids"], oof["splits"])) if s == split}
    multilabel = task == MULTILABEL
    outs: list[np.ndarray] = []
    ys: list[Any] = []
    meta: list[tuple] = []
    skipped = {"excluded": 0, "unknown_class": 0}
    for ex, y, text, source in _split_examples(index, split, labels, multilabel, skipped, iter_examples):
        k = row.get(str(ex.get("image_id") or ""))
        if k is None:
            continue
        outs.append(np.asarray(oof["logits"][k : k + 1], np.float32))
        ys.append(y)
        meta.append((str(ex.get("image_id") or ""), str(ex.get("listing_id") or ""), text, source))
    return _predictions(split, outs, ys, meta, len(labels), multilabel)


def fetch_images(preds: Sequence[Predictions], wanted: Iterable[tuple[int, int]],
                 iter_examples: Callable[[str], Iterable[Mapping[str, Any]]] | None = None) -> dict[tuple[int, int], bytes]:
    """JPEG bytes of a few examples, ``(which Predictions, row)`` → bytes, re-reading only
    the shards that hold them."""
    if iter_examples is None:
        from tasks.export import iter_examples
    need: dict[str, dict[int, list[tuple[int, int]]]] = {}
    for w, row in wanted:
        path, pos = preds[w].sources[row]
        need.setdefault(path, {}).setdefault(pos, []).append((w, row))
    out: dict[tuple[int, int], bytes] = {}
    for path, positions in need.items():
        last = max(positions)
        for pos, ex in enumerate(iter_examples(path)):
            for key in positions.get(pos, ()):
                out[key] = ex["image"]
            if pos >= last:
                break
    return out


# ---------------------------------------------------------------------------------------
# The evaluation of one version, written to storage
# ---------------------------------------------------------------------------------------
def _class_counts(preds: Sequence[Predictions], labels: Sequence[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for p in preds:
        if p.y.ndim == 1:
            for i, n in zip(*np.unique(p.y, return_counts=True)):
                counts[labels[int(i)]] = counts.get(labels[int(i)], 0) + int(n)
    return counts


def write_evaluation(
    version: Version,
    labels: Sequence[str],
    val: Predictions,
    test: Predictions,
    dataset_version: str,
    cfg: EvaluateSettings | Mapping[str, Any] | None = None,
    task: str = MULTICLASS,
    calibrate: bool = True,
    temperature: float = 1.0,
    full: bool = True,
    images: Callable[[Sequence[Predictions], Iterable[tuple[int, int]]], Mapping[tuple[int, int], bytes]] | None = None,
    skipped: Mapping[str, Any] | None = None,
    out_of_fold: Sequence[Predictions] | None = None,
) -> dict[str, Any]:
    """Everything about ``version`` on one dataset's val/test predictions, written under
    ``<version>/eval/<dataset_version>/``; returns the summary (also ``metrics.json``).

    ``calibrate``: fit the temperature on ``val`` and store it in the version (``config.json``
    and ``meta.json``); otherwise ``temperature`` (the version's own) is used. ``full=False``
    computes the headline numbers only (a champion re-evaluated for a comparison).
    ``images(preds, [(which, row)])`` gives the JPEG bytes for galleries (none without it).

    cleanlab's finders need out-of-sample probabilities: ``out_of_fold`` (a CV run's
    out-of-fold predictions of the train and val rows, :func:`out_of_fold_split`) + test
    when given, else val + test; ``summary["out_of_sample"]`` says which."""
    cfg = as_settings(EvaluateSettings, cfg)
    labels = list(labels)
    store = version.storage
    base = keys.eval_name(dataset_version)

    def put(name: str, data: bytes | str, content_type: str | None = None) -> str:
        key = version.key(f"{base}/{name}")
        store.put(key, data.encode() if isinstance(data, str) else data, content_type=content_type)
        return store.uri(key)

    files: dict[str, str] = {}
    t = fit_temperature(val.logits, val.y, task) if (calibrate and len(val)) else float(temperature)
    p1 = probabilities(test.logits, 1.0, task)
    pt = probabilities(test.logits, t, task)
    if task == MULTILABEL:
        head = multilabel_metrics(test.y, pt, labels, cfg.multilabel_threshold)
    else:
        head = headline_metrics(test.y, pt, labels)
    ece_before = expected_calibration_error(p1, test.y, cfg.ece_bins, task) if len(test) else None
    ece_after = expected_calibration_error(pt, test.y, cfg.ece_bins, task) if len(test) else None
    summary: dict[str, Any] = {
        "version": version.version,
        "dataset_version": dataset_version,
        "task": task,
        "evaluated_at": now_iso(),
        "test_split": split_fingerprint(test),
        "n_test": len(test),
        "n_val": len(val),
        "skipped": dict(skipped or {}),
        **{k: v for k, v in head.items() if k not in ("report", "report_text")},
        "temperature": t,
        "temperature_fitted": bool(calibrate and len(val)),
        "ece_before": ece_before,
        "ece_after": ece_after,
        "nll_before": nll(test.logits, test.y, 1.0, task) if len(test) else None,
        "nll_after": nll(test.logits, test.y, t, task) if len(test) else None,
    }
    oos = [p for p in (list(out_of_fold) if out_of_fold else [val]) if len(p)] + ([test] if len(test) else [])
    summary["out_of_sample"] = {
        "source": ("out-of-fold (cross-validation) " if out_of_fold else "") + " + ".join(p.split for p in oos),
        "n": {p.split: len(p) for p in oos}}
    summary["per_class"] = [
        {"class": c, **{k: (round(float(v), 4) if k != "support" else int(v)) for k, v in r.items()}}
        for c, r in head["report"].items() if isinstance(r, Mapping) and c in labels]
    files["classification_report.json"] = put("classification_report.json", json.dumps(head["report"], indent=1),
                                               "application/json")
    files["classification_report.txt"] = put("classification_report.txt", head["report_text"], "text/plain")
    if full and len(test):
        rb, ra = reliability_bins(p1, test.y, cfg.ece_bins, task), reliability_bins(pt, test.y, cfg.ece_bins, task)
        summary["reliability"] = {"before": rb, "after": ra}
        files["reliability.png"] = put("reliability.png", reliability_png(rb, ra, ece_before, ece_after, t), "image/png")
    if full and task == MULTICLASS and len(test):
        summary.update(_multiclass_analysis(put, files, labels, test, pt, oos, t, cfg, images))
    elif full and task == MULTILABEL and len(test):
        summary.update(_multilabel_analysis(put, files, labels, oos, t, cfg, images))
    summary["files"] = files
    files["metrics.json"] = put("metrics.json", json.dumps(summary, indent=1, default=float), "application/json")
    files["report.md"] = put("report.md", report_markdown(summary, head.get("report_text", "")), "text/markdown")
    summary["files"] = files
    return summary


def _gallery_items(preds: Sequence[Predictions], rows: Sequence[tuple[int, int]], captions: Sequence[str],
                   images: Callable | None) -> list[tuple[bytes | None, str]]:
    got = images(preds, rows) if (images is not None and rows) else {}
    return [(got.get(r), c) for r, c in zip(rows, captions)]


def _out_of_sample(parts: Sequence[Predictions], temperature: float, task: str
                   ) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """The out-of-sample predictions cleanlab sees, stacked (val + test, which the model
    never trained on, or a CV run's out-of-fold train + val rows + test): labels,
    probabilities at ``temperature``, and ``which[i]`` = (index in ``parts``, row) of
    example ``i``."""
    which = [(w, i) for w, p in enumerate(parts) for i in range(len(p))]
    y = np.concatenate([p.y for p in parts])
    probs = np.concatenate([probabilities(p.logits, temperature, task) for p in parts])
    return y, probs, which


def _multiclass_analysis(put, files, labels, test, pt, oos, t, cfg: EvaluateSettings, images) -> dict[str, Any]:
    out: dict[str, Any] = {}
    n = len(labels)
    pred = pt.argmax(axis=1)
    cm = confusion(test.y, pred, n)
    files["confusion.png"] = put("confusion.png", confusion_png(cm, labels, cfg.confusion_max_classes), "image/png")
    files["per_class_accuracy.png"] = put("per_class_accuracy.png", per_class_accuracy_png(cm, labels), "image/png")
    acc = per_class_accuracy(cm)
    out["per_class_accuracy"] = {labels[i]: float(acc[i]) for i in range(n) if not np.isnan(acc[i])}
    # most-confused pairs, each with its misclassified test crops
    pairs = most_confused_pairs(cm, labels, cfg.top_pairs)
    for rank, pair in enumerate(pairs, 1):
        a, b = pair["true_index"], pair["predicted_index"]
        rows = np.where((test.y == a) & (pred == b))[0]
        rows = rows[np.argsort(-pt[rows, b], kind="stable")][: cfg.gallery_images]
        items = _gallery_items([test], [(0, int(r)) for r in rows],
                               [f"p={pt[r, b]:.2f} {test.image_ids[r][:8]}" for r in rows], images)
        name = keys.confused_gallery_name(rank, pair["true"], pair["predicted"])
        pair["gallery"] = put(name, contact_sheet(items, f"true {pair['true']} predicted as {pair['predicted']} "
                                                         f"({pair['count']}, {pair['rate']:.0%})", thumb=cfg.thumb),
                              "image/png")
        pair["image_ids"] = [test.image_ids[int(r)] for r in rows]
    out["confused_pairs"] = pairs
    # cleanlab on out-of-sample probabilities: val + test, or out-of-fold train + val + test
    both = oos
    y_oos, p_oos, which = _out_of_sample(both, t, MULTICLASS)
    y_oos = y_oos.astype(np.int64)
    merges = suggest_merges(y_oos, p_oos, labels, cfg.merge_min_examples, cfg.merge_min_rate)
    out["suggested_merges"] = merges
    counts = _class_counts(both, labels)
    files["merge_map.yaml"] = put("merge_map.yaml", merge_map_yaml(merges, counts, cfg.max_merges), "text/yaml")
    issues, quality = rank_label_issues(y_oos, p_oos)
    rows = []
    for rank, i in enumerate(issues, 1):
        w, r = which[int(i)]
        p = both[w]
        probs_row = p_oos[int(i)]
        sugg = int(np.argmax(probs_row))
        rows.append({"rank": rank, "image_id": p.image_ids[r], "listing_id": p.listing_ids[r], "split": p.split,
                     "given": labels[int(y_oos[i])], "suggested": labels[sugg],
                     "p_given": float(probs_row[int(y_oos[i])]), "p_suggested": float(probs_row[sugg]),
                     "label_quality": float(quality[int(i)])})
    out["label_issues"] = {"count": len(rows), "examined": int(len(y_oos)), "top": rows[: cfg.issues_listed]}
    import pandas as pd

    frame = pd.DataFrame(rows, columns=["rank", "image_id", "listing_id", "split", "given", "suggested", "p_given",
                                        "p_suggested", "label_quality"])
    files["label_issues.csv"] = put("label_issues.csv", frame.to_csv(index=False), "text/csv")
    show = [which[int(i)] for i in issues[: cfg.gallery_issues]]
    items = _gallery_items(both, show, [f"{x['given'][:9]}>{x['suggested'][:9]}" for x in rows[: cfg.gallery_issues]],
                           images)
    files["label_issues.png"] = put("label_issues.png", contact_sheet(
        items, f"likely label errors ({len(rows)} of {len(y_oos)} {'+'.join(p.split for p in both)} images; "
               "given>suggested)",
        thumb=cfg.thumb), "image/png")
    return out


def _multilabel_analysis(put, files, labels, oos, t, cfg: EvaluateSettings, images) -> dict[str, Any]:
    both = oos
    y_oos, p_oos, which = _out_of_sample(both, t, MULTILABEL)
    lists = [list(np.where(row > 0)[0]) for row in y_oos]
    issues, quality = rank_label_issues(lists, p_oos, multi_label=True)
    rows = []
    for rank, i in enumerate(issues, 1):
        w, r = which[int(i)]
        rows.append({"rank": rank, "image_id": both[w].image_ids[r], "split": both[w].split,
                     "given": "|".join(labels[j] for j in lists[int(i)]),
                     "suggested": "|".join(labels[j] for j in np.where(p_oos[int(i)] >= 0.5)[0]),
                     "label_quality": float(quality[int(i)])})
    import pandas as pd

    files["label_issues.csv"] = put("label_issues.csv", pd.DataFrame(
        rows, columns=["rank", "image_id", "split", "given", "suggested", "label_quality"]).to_csv(index=False),
        "text/csv")
    show = [which[int(i)] for i in issues[: cfg.gallery_issues]]
    items = _gallery_items(both, show, [x["given"][:20] for x in rows[: cfg.gallery_issues]], images)
    files["label_issues.png"] = put("label_issues.png", contact_sheet(items, "likely label errors", thumb=cfg.thumb),
                                    "image/png")
    return {"label_issues": {"count": len(rows), "examined": int(len(y_oos)), "top": rows[: cfg.issues_listed]}}


def _fmt(x: Any, pct: bool = True) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.1f}%" if pct else f"{x:.4f}"


def report_markdown(summary: Mapping[str, Any], report_text: str = "") -> str:
    """The evaluation as markdown (``report.md`` and the Prefect artifact)."""
    s, f = summary, summary.get("files", {})
    lines = [f"## Classifier {s['version']} on dataset {s['dataset_version']}", ""]
    if s.get("task") == MULTILABEL:
        lines += ["| binary accuracy | subset accuracy | micro-F1 | macro-F1 | test images |", "|---|---|---|---|---|",
                  f"| {_fmt(s.get('binary_accuracy'))} | {_fmt(s.get('subset_accuracy'))} | {_fmt(s.get('micro_f1'))} "
                  f"| {_fmt(s.get('macro_f1'))} | {s['n_test']} |"]
    else:
        lines += [f"| top-1 | top-{s.get('top_k', 5)} | macro-F1 | test images | classes in test |", "|---|---|---|---|---|",
                  f"| {_fmt(s.get('top1'))} | {_fmt(s.get('top5'))} | {_fmt(s.get('macro_f1'))} | {s['n_test']} "
                  f"| {s.get('classes_in_test', '')} |"]
    lines += ["", f"Calibration: temperature {s['temperature']:.3f} "
              f"({'fitted on ' + str(s['n_val']) + ' val images' if s.get('temperature_fitted') else 'as stored'}); "
              f"ECE {_fmt(s.get('ece_before'), False)} → {_fmt(s.get('ece_after'), False)}.", ""]
    if s.get("skipped") and any(s["skipped"].values()):
        lines += [f"Not evaluated: {dict(s['skipped'])}.", ""]
    for name, title in (("confusion.png", "confusion matrix"), ("per_class_accuracy.png", "per-class accuracy"),
                        ("reliability.png", "reliability diagram"), ("label_issues.png", "likely label errors")):
        if name in f:
            lines += [f"![{title}]({f[name]})", ""]
    if s.get("confused_pairs"):
        lines += ["### Most-confused pairs", "", "| true | predicted as | count | rate | reverse | gallery |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {p['true']} | {p['predicted']} | {p['count']} | {p['rate']:.0%} | {p['reverse_count']} "
                  f"| [png]({p['gallery']}) |" for p in s["confused_pairs"]]
        lines.append("")
    if "suggested_merges" in s:
        lines += ["### Suggested merges (cleanlab, both directions)", ""]
        lines += [f"- {m['classes'][0]} ↔ {m['classes'][1]}: joint probability {m['joint_probability']:.4f}"
                  for m in s["suggested_merges"]] or ["- none"]
        if "merge_map.yaml" in f:
            lines += ["", f"Ready `classes.merge_map`: `{f['merge_map.yaml']}`"]
        lines.append("")
    if s.get("label_issues"):
        li = s["label_issues"]
        source = (s.get("out_of_sample") or {}).get("source", "val + test")
        lines += [f"### Likely label errors: {li['count']} of {li['examined']} images ({source})", "",
                  "| rank | image | listing | given | suggested | quality |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['rank']} | {r['image_id'][:12]} | {r.get('listing_id', '')} | {r['given']} | {r['suggested']} "
                  f"| {r['label_quality']:.3f} |" for r in li["top"][:20]]
        if "label_issues.csv" in f:
            lines += ["", f"Full ranked list: `{f['label_issues.csv']}`"]
        lines.append("")
    if report_text:
        lines += ["### classification_report (test)", "", "```", report_text.rstrip(), "```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Storage-facing steps: evaluate a registered version, champion/challenger
# ---------------------------------------------------------------------------------------
class EvaluationError(UserError, RuntimeError):
    """Nothing to evaluate on (no test images); the message says what to run."""


def dataset_version_of(index: Any, store: Storage, spec: str) -> str:
    """The dataset version an export index belongs to (``index.version`` when it has one)."""
    v = getattr(index, "version", None) or getattr(index, "dataset_version", None)
    if v:
        return str(v)
    if spec and spec != "latest":
        return str(spec)
    try:
        return str(json.loads(store.get(keys.pointer_key("dataset")))["version"])
    except (KeyError, ValueError):
        return "latest"


def _load_predictor(store: Storage, version: Version) -> Predictor:
    from models.classifier import ClassifierPredictor

    return ClassifierPredictor.load(version, storage=store)


def _fresh(version: Version) -> Version:
    """The version with its ``meta.json`` as stored now."""
    meta = version.get_json(keys.META_NAME)
    return Version(version.kind, version.version, version.storage, version.prefix, meta, version.main)


def _store_temperature(reg: Registry, version: Version, t: float) -> Version:
    if version.exists("config.json"):
        config = version.get_json("config.json")
        config["temperature"] = t
        version.storage.put(version.key("config.json"), json.dumps(config, indent=2, default=str).encode(),
                            content_type="application/json")
    return reg.update_meta(version, temperature=t)


def evaluate_version(
    store: Storage | str | None = None,
    version_spec: str | Version = "latest",
    dataset_version: str = "latest",
    cfg: EvaluateSettings | Mapping[str, Any] | None = None,
    calibrate: bool = True,
    full: bool = True,
    predictor: Predictor | None = None,
) -> dict[str, Any]:
    """Evaluate a registered classifier on a dataset export's val/test splits and write the
    evaluation under ``models/classifier/<version>/eval/<dataset version>/``. With
    ``calibrate``, the temperature fitted on val is stored in the version (``config.json``,
    ``meta.json``). The version's ``meta.json`` gets ``evaluations[<dataset version>]``
    (headline numbers + test-split fingerprint) and, with ``calibrate``, ``metrics``
    (:func:`record_evaluation`). The label-issue finders see a CV run's out-of-fold train
    and val rows + test when the version has them for this dataset, else val + test (a
    CV model trained on part of val: its own val probabilities are not out-of-sample).
    Returns the summary."""
    cfg = as_settings(EvaluateSettings, cfg)
    store = open_storage(store)
    reg = Registry(store)
    version = version_spec if isinstance(version_spec, Version) else reg.resolve("classifier", version_spec)
    from tasks.export import iter_examples, open_export

    index = open_export(store, dataset_version)
    ds = dataset_version_of(index, store, dataset_version)
    predictor = predictor or _load_predictor(store, version)
    task_ = getattr(predictor, "task", MULTICLASS)
    splits = list(getattr(index, "splits", ["val", "test"]))
    if "test" not in splits or index.count("test") == 0:
        raise EvaluationError(f"dataset {ds} has no test images to evaluate on: run `carflow dataset --tfrecord` "
                              "with split.test > 0")
    test, skipped_t = predict_split(predictor, index, "test", cfg.batch_size, iter_examples)
    if "val" in splits and index.count("val") > 0 and (calibrate or full):
        val, skipped_v = predict_split(predictor, index, "val", cfg.batch_size, iter_examples)
    else:
        val, skipped_v = Predictions("val", np.zeros((0, len(predictor.labels))), test.y[:0]), {}
    if len(test) == 0:
        raise EvaluationError(f"none of dataset {ds}'s test images is in a class of classifier {version.version} "
                              f"(skipped: {skipped_t}): train on this dataset with `carflow train`")
    out_of_fold = None
    oof = load_out_of_fold(version) if full else None
    if oof is not None and (version.meta or {}).get("dataset_version") == ds:  # CV of this very dataset
        out_of_fold = [out_of_fold_split(oof, index, sp, predictor.labels, task_, iter_examples)
                       for sp in ("train", "val") if sp in splits]
    summary = write_evaluation(
        version, predictor.labels, val, test, ds, cfg, task_, calibrate=calibrate,
        temperature=float(getattr(predictor, "temperature", 1.0) or 1.0), full=full,
        images=lambda preds, wanted: fetch_images(preds, wanted, iter_examples),
        skipped={"test": skipped_t, "val": skipped_v}, out_of_fold=out_of_fold,
    )
    record_evaluation(version, summary, calibrate)
    return summary


def record_evaluation(version: Version, summary: Mapping[str, Any], calibrate: bool = True) -> Version:
    """Put an evaluation's headline numbers into the version's ``meta.json``:
    ``evaluations[<dataset version>]`` always (with the test-split fingerprint that
    champion/challenger compares on), ``metrics`` and the fitted ``temperature`` (also into
    ``config.json``, which the predictor reads) when ``calibrate``."""
    reg = Registry(version.storage)
    ds = summary["dataset_version"]
    headline = {k: summary.get(k) for k in ("top1", "top5", "macro_f1", "binary_accuracy", "subset_accuracy",
                                             "ece_before", "ece_after", "temperature", "n_test", "test_split",
                                             "evaluated_at") if k in summary}
    headline["dataset_version"] = ds
    headline["eval"] = version.uri(keys.eval_name(ds))
    version = _fresh(version)
    fields: dict[str, Any] = {"evaluations": {**(version.meta.get("evaluations") or {}), ds: headline}}
    if calibrate:  # the version's own evaluation (a champion re-evaluated elsewhere keeps its metrics)
        fields["metrics"] = {**(version.meta.get("metrics") or {}), **headline}
    version = reg.update_meta(version, **fields)
    if calibrate:
        version = _store_temperature(reg, version, float(summary["temperature"]))
    return version


def _top1(meta: Mapping[str, Any] | None, ds: str) -> tuple[float | None, str | None]:
    ev = ((meta or {}).get("evaluations") or {}).get(ds) or {}
    v = ev.get("top1", ev.get("binary_accuracy"))
    return (None if v is None else float(v)), ev.get("test_split")


def promote_if_better(store: Storage | str | None, version: str | Version, force: bool = False,
                      cfg: EvaluateSettings | Mapping[str, Any] | None = None) -> Decision:
    """Champion/challenger: move ``classifier/latest`` to ``version`` when its test top-1 is
    at least the current champion's on the *same* test split (the champion is evaluated on
    the candidate's dataset first when its recorded split differs), or with ``force``.
    The decision and both numbers go to ``<version>/promotion.json`` (:meth:`Registry.promote`)
    and the candidate's ``meta.json`` (``promotion``)."""
    store = open_storage(store)
    reg = Registry(store)
    cand = _fresh(version if isinstance(version, Version) else reg.resolve("classifier", version))
    metrics = cand.meta.get("metrics") or {}
    ds = metrics.get("dataset_version")
    if not ds:
        raise EvaluationError(f"classifier {cand.version} has not been evaluated: run `carflow evaluate --model "
                              f"{cand.version}` first")
    c_top1, c_split = _top1(cand.meta, ds)
    champion = reg.latest("classifier")
    note = ""
    if champion is not None and champion.version != cand.version:
        i_top1, i_split = _top1(champion.meta, ds)
        if i_top1 is None or i_split != c_split:
            try:
                evaluate_version(store, champion, ds, cfg, calibrate=False, full=False)
                note = f"; champion {champion.version} re-evaluated on dataset {ds}'s test split"
            except Exception as exc:  # noqa: BLE001 - recorded in the decision
                note = f"; champion {champion.version} could not be evaluated on dataset {ds}: {exc}"
        champion = reg.get("classifier", champion.version)

    def rule(c_meta: dict[str, Any], i_meta: dict[str, Any] | None) -> tuple[bool, str, float | None, float | None]:
        c, cs = _top1(c_meta, ds)
        if i_meta is None:
            return True, "no current classifier" + note, c, None
        i, is_ = _top1(i_meta, ds)
        if c is None:
            ok, why = False, "candidate has no test top-1"
        elif i is None or is_ != cs:
            ok, why = False, f"current classifier has no top-1 on test split {cs}"
        elif c >= i:
            ok, why = True, f"top-1 {c:.4f} >= current {i:.4f} on test split {cs}"
        else:
            ok, why = False, f"top-1 {c:.4f} < current {i:.4f} on test split {cs}"
        if force and not ok:
            ok, why = True, f"forced ({why})"
        return ok, why + note, c, i

    rule.__name__ = "top1_at_least_on_same_test_split" + ("_or_force" if force else "")
    decision = reg.promote("classifier", cand, rule)
    reg.update_meta(_fresh(cand),
                    promotion={**decision.as_dict(), "dataset_version": ds, "test_split": c_split, "forced": force,
                               "decided_at": now_iso()})
    return decision


# ---------------------------------------------------------------------------------------
# Prefect tasks (thin)
# ---------------------------------------------------------------------------------------
@task(name="evaluate-classifier", retries=0)
def evaluate_version_task(storage: str | None, version: str, dataset_version: str,
                          config: dict[str, Any] | None = None, calibrate: bool = True) -> dict[str, Any]:
    with gpu_slot():  # inference: one model stage per GPU at a time
        return evaluate_version(storage, version, dataset_version, config, calibrate=calibrate)


@task(name="promote-classifier", retries=1)
def promote_task(storage: str | None, version: str, force: bool = False,
                 config: dict[str, Any] | None = None) -> dict[str, Any]:
    return promote_if_better(storage, version, force, config).as_dict()
