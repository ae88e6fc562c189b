"""Honest confidence: a temperature that calibrates the softmax, and the rule that answers
"unknown" for an image unlike every class.

Temperature scaling (Guo et al., 2017) divides the logits by one number T fitted on the val
set: the predicted class never changes, only how sure the model says it is. The unknown rule
reads the backbone's features, not the softmax (a network is often confidently wrong on
images of no known class): an image's distance to the training images is the Mahalanobis
distance of its pooled features of every backbone stage (Lee et al., 2018: the earlier
stages see style, colour and texture, the last one content) from the training images'
Gaussian, with a shrunk covariance kept as its leading components (probabilistic PCA). Images
farther than a threshold set on val are unknown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

T_RANGE = (0.05, 20.0)
LOG_T_PRIOR_SD = 1.0  # fit_temperature's prior: T within 0.14-7.4 at two sd
KEEP_CORRECT = 0.99  # the threshold keeps this share of the val images the model gets right
MARGIN = 0.02  # and sits this much farther: predict's features differ a little from the cached fp16 ones
COMPONENTS = 128  # of the covariance kept in the model file; the others count as their average
SHRINK = 0.1  # ridge added to every variance, as a share of the average one: few images, many dimensions


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, prior_sd: float | None = LOG_T_PRIOR_SD) -> float:
    """The T > 0 that minimises the val set's negative log-likelihood of softmax(logits / T), with
    a Gaussian prior on log T (sd LOG_T_PRIOR_SD, centred on T = 1). The prior weighs as much as a
    few images: on a val set of a handful it keeps T from whatever those few say (9 val images
    fitted T = 0.24, 3 images 0.08, 24 of random labels 0.11 and raised their ECE); on hundreds it
    changes little (ants/bees' 153: T 0.458 -> 0.474, val ECE after 0.030 -> 0.019).
    Simulated (benchmarks/sim_temperature.py: calibrated logits of a known T in 0.5-2, 200 draws):
    24 val images of 2 classes, held-out NLL 0.27 -> 0.16 (T = 0.5) and 0.40 -> 0.30 (T = 1);
    200 and 800 images the same to 0.002 (BENCHMARKS.md, "Calibration on a few val images").
    `prior_sd` None: no prior (the plain maximum-likelihood fit the simulation compares with)."""
    logits, labels = logits.float(), labels.long()
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels, reduction="sum")
        if prior_sd is not None:
            loss = loss + log_t.square().sum() / (2 * prior_sd ** 2)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return float(log_t.detach().exp().clamp(*T_RANGE))


def uncalibrated(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """The probabilities before the temperature: softmax(logits / T) back to softmax(logits)
    (log p is logits / T less a constant per image)."""
    return (probs.clamp_min(1e-30).log() * temperature).softmax(1)


@dataclass
class FeatureDistance:
    """How far an image is from the training images: the Mahalanobis distance of its features
    (every stage, pooled) from their mean, with a shrunk covariance, as a root mean square per
    dimension (about 1 for a typical training image)."""

    mean: torch.Tensor  # [dim]
    components: torch.Tensor  # [dim, k] leading eigenvectors of the covariance (fp16 in the file)
    scales: torch.Tensor  # [k] their variances, shrunk
    rest: torch.Tensor  # [1] the variance of every other direction, shrunk

    @classmethod
    def of(cls, train_features: torch.Tensor) -> "FeatureDistance":
        """Fitted on training features [images, dim]: the leading components by a randomised SVD
        (a full eigendecomposition costs O(dim^3): a second at 2,064 dims on two cores), the
        variance of the other directions from the trace."""
        x = train_features.float()
        mean = x.mean(0)
        centred = x - mean
        dim = x.shape[1]
        k = min(COMPONENTS, dim, max(1, len(x) - 1))
        with torch.random.fork_rng(devices=[]):  # its random projections leave the run's random streams alone
            torch.manual_seed(0)
            _, s, v = torch.svd_lowrank(centred, q=min(k + 10, dim, len(x)), niter=4)
        variances = (s[:k].square() / len(x)).double()
        total = float(centred.double().square().sum() / len(x))  # the trace: every direction's variance
        ridge = SHRINK * total / dim + 1e-12
        rest = max(total - float(variances.sum()), 0.0) / max(1, dim - k) + ridge
        return cls(mean, v[:, :k].half(), (variances + ridge).float(), torch.tensor([rest], dtype=torch.float32))

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """[images]: the distance of each row of `features` [images, dim]."""
        device = features.device
        z = features.float() - self.mean.to(device)
        p = z @ self.components.to(device).float()
        d2 = (p.square() / self.scales.to(device)).sum(1)
        d2 = d2 + (z.square().sum(1) - p.square().sum(1)).clamp_min(0) / self.rest.to(device)
        return (d2 / z.shape[1]).sqrt()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"distance.mean": self.mean, "distance.components": self.components, "distance.scales": self.scales,
                "distance.rest": self.rest}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "FeatureDistance | None":
        """From a model file's tensors; None when it has none (files from before the unknown rule).
        ValueError when they do not fit together."""
        if not tensors:
            return None
        try:
            mean, comps, scales, rest = (tensors[f"distance.{k}"] for k in ("mean", "components", "scales", "rest"))
        except KeyError as e:
            raise ValueError(f"{e.args[0]} missing") from None
        if (mean.dim() != 1 or comps.dim() != 2 or comps.shape[0] != len(mean) or scales.shape != (comps.shape[1],)
                or rest.shape != (1,) or not bool((scales > 0).all()) or not float(rest) > 0):
            raise ValueError("tensors of mismatched shapes or non-positive variances")
        return cls(mean.float(), comps, scales.float(), rest.float())


FEW_VAL_KEEP = 0.95  # on few val images, what the prediction bound aims to keep (0.99 let X-rays pass for photos: 20 val images)


def too_few_to_place(n: int) -> bool:
    """Whether KEEP_CORRECT's quantile of n distances is simply their largest (n up to 100)."""
    return (n - 1) * (1 - KEEP_CORRECT) < 1


def bound_applies(n: int) -> bool:
    """Whether distance_threshold floors the quantile of n distances with a prediction bound (from 3:
    a spread needs two, and one more to mean anything)."""
    return n >= 3 and too_few_to_place(n)


def distance_threshold(val_distance: torch.Tensor, val_correct: torch.Tensor) -> float:
    """The distance beyond which an image is unknown: it keeps KEEP_CORRECT of the val images the
    model got right (all val images when it got none right), and MARGIN more.

    On up to 100 images that quantile is their largest distance, and a new image of the same kind
    lies beyond the largest of n with chance 1/(n+1): 17% of a 12-image val set's own kind were
    called unknown. There the threshold is at least the FEW_VAL_KEEP upper prediction bound of a
    log-normal fitted to them (Student's t: the fewer the images, the wider); not higher, as 0.99
    would be: on 20 val images it let most X-rays pass for ants and bees (BENCHMARKS.md)."""
    basis = (val_distance[val_correct] if val_correct.any() else val_distance).float()
    threshold = float(torch.quantile(basis, KEEP_CORRECT, interpolation="higher"))
    n = len(basis)
    if bound_applies(n):
        logs = basis.clamp_min(1e-12).log()
        bound = float(logs.mean() + student_t_quantile(FEW_VAL_KEEP, n - 1) * logs.std() * (1 + 1 / n) ** 0.5)
        threshold = max(threshold, math.exp(bound))
    return threshold * (1 + MARGIN)


def student_t_quantile(p: float, df: int) -> float:
    """Student's t quantile by its Cornish-Fisher expansion around the normal one (Abramowitz and
    Stegun 26.7.5; at p = 0.99 within 2.2% at 2 degrees of freedom, 0.1% from 5)."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf(p)
    terms = ((z**3 + z) / 4, (5 * z**5 + 16 * z**3 + 3 * z) / 96, (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
             (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160)
    return z + sum(g / df ** (k + 1) for k, g in enumerate(terms))


def calibrate(val_logits: torch.Tensor, val_labels: torch.Tensor, train_features: torch.Tensor,
              val_features: torch.Tensor) -> tuple[dict, dict, FeatureDistance]:
    """A model's temperature and unknown rule from its val answers and the backbone's features
    (every stage, pooled) of training and val images: (the model file's `calibration` and
    `unknown` metadata, the FeatureDistance)."""
    from .metrics import calibration as ece_of

    labels = val_labels.tolist()
    t = fit_temperature(val_logits, val_labels)
    calibration = {"temperature": t, "fitted_on": "val", "val_ece_before": ece_of(val_logits.softmax(1), labels)["ece"],
                   "val_ece_after": ece_of((val_logits / t).softmax(1), labels)["ece"]}
    distance = FeatureDistance.of(train_features)
    val_distance = distance(val_features)
    correct = val_logits.argmax(1) == val_labels
    threshold = distance_threshold(val_distance, correct)
    set_on = int(correct.sum()) or len(correct)  # (the images the threshold was placed on)
    unknown = {"score": "distance", "threshold": threshold, "keep_correct_val": KEEP_CORRECT, "set_on_val_images": set_on,
               "few_val_bound": FEW_VAL_KEEP if bound_applies(set_on) else None,
               "components": int(distance.components.shape[1]), "train_images": len(train_features),
               "val_flagged": float((val_distance > threshold).float().mean()),
               "how": "Mahalanobis distance of the backbone's pooled features of every stage from the training images' (shrunk covariance), RMS per dimension"}
    return calibration, unknown, distance
