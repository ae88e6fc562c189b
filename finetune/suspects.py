"""Suspected label errors in the training set, of two kinds.

- Another class: each training image gets an out-of-fold probability for every class (heads
  trained on the cached backbone features of the other folds judge it, so its own label
  cannot have taught them the answer). It is a suspect when another class is as probable for
  it as that class's own images typically find themselves to be (the per-class thresholds of
  confident learning, Northcutt et al., 2021) and more probable than its given label.
- No class: the images least like any other training image (the lowest mean similarity to
  their nearest neighbours in feature space), a fixed small share of the set: a placeholder
  picture, a document scanned into a folder of photos, which a head may still file confidently
  under some class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .store import norm_statistics

FOLDS = 5
MIN_PER_CLASS = 2  # fewer images in a class, and a fold's head may never see it: no suspects then
OUTLIER_SHARE = 0.01  # the share of training images listed as unlike the others (rounded up)
NEIGHBOURS = 5
MAX_REFERENCES = 10_000  # neighbours are looked for among at most this many images: the cost stays O(n)


@dataclass(frozen=True)
class Suspect:
    index: int  # of the training image
    suggested: int | None  # the class it looks like; None: unlike every training image
    probability: float  # the out-of-fold probability of its given label


def fold_of_each(labels: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """A fold number per image, stratified: each class is dealt round the folds in a seeded order."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(len(labels), dtype=torch.long)
    for c in labels.unique():
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=g)]
        out[members] = torch.arange(len(members)) % folds
    return out


def fit_linear(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """A multinomial logistic regression on standardised features, fitted by L-BFGS: its (weight, bias).
    Started at zero, not at random: the run's random numbers are left as they were."""
    weight = torch.zeros(num_classes, x.shape[1], requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1, max_iter=100, history_size=10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(F.linear(x, weight, bias), y) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return weight.detach(), bias.detach()


def out_of_fold_probabilities(features: torch.Tensor, labels: torch.Tensor, num_classes: int, folds: int = FOLDS,
                              seed: int = 0) -> torch.Tensor:
    """[images, classes]: each image's class probabilities from a head that never saw it."""
    x = features.float()
    fold = fold_of_each(labels, folds, seed)
    probs = torch.empty(len(labels), num_classes)
    for k in range(folds):
        held = fold == k
        if not held.any():
            continue
        fit_x = x[~held]
        mean, std = norm_statistics(fit_x)
        with torch.enable_grad():
            weight, bias = fit_linear((fit_x - mean) / std, labels[~held], num_classes)
        probs[held] = F.linear((x[held] - mean) / std, weight, bias).softmax(1)
    return probs


def label_issues(probs: torch.Tensor, labels: torch.Tensor) -> list[tuple[int, int, float]]:
    """(image index, suggested class, probability of the given label), most suspicious first."""
    num_classes = probs.shape[1]
    # What the heads typically give a class on its own images: another class's image reaching it is suspicious.
    thresholds = torch.stack([probs[labels == c, c].mean() if (labels == c).any() else torch.tensor(1.0)
                              for c in range(num_classes)])
    confident = probs >= thresholds  # [images, classes]
    candidates = torch.where(confident, probs, torch.full_like(probs, -1.0))
    suggested = candidates.argmax(1)
    given_p = probs[torch.arange(len(labels)), labels]
    flagged = confident.any(1) & (suggested != labels) & (probs[torch.arange(len(labels)), suggested] > given_p)
    order = sorted(flagged.nonzero().flatten().tolist(), key=lambda i: float(given_p[i]))
    return [(i, int(suggested[i]), float(given_p[i])) for i in order]


def typicality(features: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Each image's mean cosine similarity (standardised features) to its NEIGHBOURS nearest
    other images, among at most MAX_REFERENCES of them."""
    f = features.float()
    mean, std = norm_statistics(f)
    f = F.normalize((f - mean) / std, dim=1)
    refs = torch.randperm(len(f), generator=torch.Generator().manual_seed(seed))[:MAX_REFERENCES].sort().values
    k = min(NEIGHBOURS, len(refs) - 1)
    out = torch.empty(len(f))
    for start in range(0, len(f), 2048):
        sim = f[start:start + 2048] @ f[refs].T
        rows = torch.arange(start, min(start + 2048, len(f)))
        sim[rows[:, None] == refs[None, :]] = -2.0  # an image is not its own neighbour
        out[rows] = sim.topk(k, 1).values.mean(1)
    return out


def least_typical(features: torch.Tensor, seed: int = 0) -> list[int]:
    """The OUTLIER_SHARE of images (at least one) least like the others, least typical first."""
    count = math.ceil(OUTLIER_SHARE * len(features))
    return typicality(features, seed).argsort()[:count].tolist()


MIN_JUDGED_RIGHT = 0.7  # out-of-fold heads right on fewer training images: their claims are noise, none listed


def find_suspects(features: torch.Tensor, labels: torch.Tensor, num_classes: int, seed: int = 0,
                  final: torch.Tensor | None = None) -> tuple[list[Suspect], float] | None:
    """The suspected label errors among training images: those another class claims (label_issues
    on `features`, what the head reads; none where the out-of-fold heads are right on under
    MIN_JUDGED_RIGHT of the images: a trial's 48 classes at 0.25 had 75% of its images "claimed"),
    then those unlike the rest (least_typical on `final`, the backbone's final features; default
    `features`); and the share of images the out-of-fold heads are right on. None when a class
    has too few images to cross-validate."""
    counts = torch.bincount(labels, minlength=num_classes)
    if len(labels) < FOLDS or int(counts.min()) < MIN_PER_CLASS:
        return None
    probs = out_of_fold_probabilities(features, labels, num_classes, min(FOLDS, int(counts.min())), seed)
    judged_right = float((probs.argmax(1) == labels).float().mean())
    claimed = [Suspect(i, j, p) for i, j, p in label_issues(probs, labels)] if judged_right >= MIN_JUDGED_RIGHT else []
    seen = {s.index for s in claimed}
    unlike = [Suspect(i, None, float(probs[i, labels[i]])) for i in least_typical(features if final is None else final, seed)
              if i not in seen]
    return claimed + unlike, judged_right


NEAR_COPY = 0.9  # cosine of centred final features, at least: a copy resized to 97% and saved again at JPEG 80
# reaches it about 7 times in 10 (0.85: 94%), chest X-rays of one patient taken twice 1.0; distinct images,
# measured: ants/bees' val against train 0.71 at most, chest_xray's train among itself 27 pairs over 0.9 (all 1.0).
CLOSER = 3  # and this many times closer (1 - cosine) than training images typically are to their second nearest:
# where every image is alike (plain colour and noise: the tests' images, 0.91-0.95 apart) nothing is a copy.
# (The second nearest: a set full of copies has each image's twin nearest.) Medians measured: ants/bees 0.41,
# chest_xray 0.60, a folder of copies 0.44, colour and noise 0.87.
TYPICAL_SAMPLE = 500


def alike_to_others(reference: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """[sample, images]: a seeded sample of TYPICAL_SAMPLE training images' cosines to every training
    image (`reference`: their features centred and normalised), each to itself -2 (left out)."""
    sample = torch.randperm(len(reference), generator=torch.Generator().manual_seed(seed))[:TYPICAL_SAMPLE]
    sim = reference[sample] @ reference.T
    sim[torch.arange(len(sample)), sample] = -2.0
    return sim


def typical_second_nearest(train: torch.Tensor, seed: int = 0) -> float:
    """The median, over a seeded sample of training images, of the cosine to their second most alike
    other training image (features as near_copies takes them)."""
    if len(train) < 3:
        return 0.0
    return float(alike_to_others(train, seed).topk(2, 1).values[:, 1].median())


def near_copies(train: torch.Tensor, held_out: torch.Tensor, chunk: int = 1024) -> list[tuple[int, int, float]]:
    """(held-out index, train index, similarity) of the held-out images whose backbone features
    [images, dim] are alike to a training image's (the cosine of features centred on the training
    images' mean: what all images share taken out) NEAR_COPY or more, and CLOSER times closer than
    training images typically are to others; the most alike training image each, in held-out order.
    What identical bytes do not catch: a photo resized, recompressed, or shot twice in a burst,
    which inflates val accuracy and the choices made on it."""
    if not len(train) or not len(held_out):
        return []
    mean = train.float().mean(0)
    reference = F.normalize(train.float() - mean, dim=1)
    least = max(NEAR_COPY, 1 - (1 - typical_second_nearest(reference)) / CLOSER)
    found = []
    for start in range(0, len(held_out), chunk):
        best, which = (F.normalize(held_out[start:start + chunk].float() - mean, dim=1) @ reference.T).max(1)
        found += [(start + i, int(which[i]), float(best[i])) for i in (best >= least).nonzero().flatten().tolist()]
    return found


UNLIKE_TRAINING = 0.75  # held-out images' median likeness to their nearest training image, under this share of
# the training images' own: another source. Measured (the final features, centred): ants/bees val 0.457 against
# train 0.472 (0.97), chest_xray val 0.627 against 0.621 (1.01); ants/bees' val shrunk to 32 px against its train
# 0.290 against 0.472 (0.61: val 0.71 where the same val at full size gave 0.97).


def median_likeness(train: torch.Tensor, held_out: torch.Tensor | None = None, seed: int = 0, chunk: int = 1024) -> float:
    """The median cosine (features centred on the training images' mean) of images to their most
    alike training image: of the held-out images, or (None) of a seeded sample of training images,
    themselves left out."""
    mean = train.float().mean(0)
    reference = F.normalize(train.float() - mean, dim=1)
    if held_out is None:
        return float(alike_to_others(reference, seed).max(1).values.median())
    best = torch.cat([(F.normalize(held_out[i:i + chunk].float() - mean, dim=1) @ reference.T).max(1).values
                      for i in range(0, len(held_out), chunk)])
    return float(best.median())
