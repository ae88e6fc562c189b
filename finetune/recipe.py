"""The default recipe adapts to the data, decided on held-out data rather than fixed.

Measured on this project's datasets (BENCHMARKS.md, "Recipes"): no single head recipe wins
everywhere. Photos like ImageNet's (ants/bees) do best with the final features of a few
augmented views per image; X-rays do best with the pooled features of every stage of the
backbone, standardised, on the plain (unaugmented) view, since cropping and colour jitter
make an X-ray something it is not. Features are computed once, so trying each head costs
seconds: every candidate is trained as the run's head stage would be and the one with the best
validation accuracy (then the lower validation loss) is kept as that stage, not trained again,
and the run says which and why.

Augmented views cost a pass of the backbone each. They matter most when images are few,
so their number follows the size of the training set (at most 3, none above 3,000 images).

Then the tail (stages.TailStage): the backbone's last blocks trained with the head, on the
activations entering them that the feature pass kept, where the frozen features fall short:
when the head fits under TAIL_FIT of its own training images (it underfits: the textures), or
when every stage's features won the head's choice (images unlike ImageNet's: the X-rays).
Measured (BENCHMARKS.md, "The tail stage"): chest X-rays 0.9847 -> 0.9872 test, the textures
0.9458 -> 0.9583 when the best epoch on val was kept (the same as the head's, 0.9458, since
a stage's last epoch is: "Which epoch is kept"); on ants/bees, whose head fits every
training image on the final features, it found nothing better on val and would only cost time. Its epochs are fixed (TAIL_EPOCHS),
so that a run is repeatable; the throughput measured before it only decides whether it fits
TAIL_BUDGET_S.

Then whole-network fine-tuning (stages.FinetuneStage), planned where the device trains the
whole network fast (plan_finetune): on a GPU, where an epoch of 5,000 images takes seconds,
FINETUNE_EPOCHS epochs are the natural next step when they fit FINETUNE_BUDGET_S. A CPU trains
it at some images a second (a 2-core one about 11, Lite0 at 224 px: an epoch of chest_xray's
4,400 training images took 426 s with its val) and is not planned to: measuring it would
itself take seconds there, and --finetune-epochs N asks. An epoch no better on val than the
model before it does not replace that model (tracking.py).

With --time-budget, the tail's and fine-tuning's epochs are what fits in what the run has left
(fit_in_budget), at the pace measured on the device, a CPU's too.

Beyond GROW_FROM training images, more images often buy nothing (issue 16's measurement: a
25,000-photo cats/dogs folder gave 0.990 val against 0.992 from 1,200 of them, at 24 times the cost). So the training
set grows in steps instead (2,000 images, then doubling, a stratified seeded order): after
each step a quick head is measured on val, and the growth stops when doubling no longer
cut the val error by a tenth (and by two val images at least). The time then follows what
more data buys, not the file count; `--all-images` uses every one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .config import (FAST_TRAINING_RATE, FINETUNE_BUDGET_S, FINETUNE_EPOCHS, FIRST_STEP, FIT_SAMPLE, GROW_FROM,
                     IMAGES_FOR_NO_VIEWS, LONG_IMAGE_RATIO, MAX_BUDGETED_FINETUNE_EPOCHS, MAX_EXTRA_VIEWS,
                     TAIL_BUDGET_S, TAIL_EPOCHS, TAIL_FIT, TrainConfig)
from .data import DatasetSplit, Preprocessing, Sample
from .features import FeatureSet
from .fit import Run, about, fit_stage
from .models import Classifier, FeatureNorm, new_head_module
from .progress import Reporter
from .records import EpochRecord, HeadChoice
from .resume import ResumeState
from .runs import RunFolder
from .stages import LossFn, head_stage
from .store import narrow, norm_statistics


def choose_fit(paths: list[Path], seed: int) -> tuple[str, str]:
    """--fit auto: squash where most training images (a seeded sample of FIT_SAMPLE, by their headers)
    are LONG_IMAGE_RATIO times as long as wide or more, whose ends the centre crop never sees (a
    trial's receipts, told apart by header and footer: val 0.30 cropped, 1.0 squashed); else crop,
    which keeps a photo's proportions. And why, in a few words."""
    import random

    from .images import long_side_ratio, squashes

    sample = random.Random(seed).sample(paths, min(len(paths), FIT_SAMPLE))
    ratios = [r for r in map(long_side_ratio, sample) if r is not None]
    long = sum(r >= LONG_IMAGE_RATIO for r in ratios)
    if squashes(ratios):
        return "squash", (f"{long} of {len(ratios)} training images read are at least {LONG_IMAGE_RATIO:g} times as long as "
                          f"wide: each is taken whole, squashed to a square; --fit crop keeps their centres instead")
    return "crop", "the centre crop"


def views_for(num_train: int, requested: int | None) -> int:
    """Views per training image: as asked, else 1 + 3000 // images, at most 1 + 3."""
    if requested is not None:
        return requested
    return 1 + min(MAX_EXTRA_VIEWS, IMAGES_FOR_NO_VIEWS // max(1, num_train))


def growth_steps(num_train: int) -> list[int]:
    """Training-set sizes to measure: 2,000, 4,000, 8,000, ... then all (all at once up to GROW_FROM)."""
    if num_train <= GROW_FROM:
        return [num_train]
    steps = [FIRST_STEP]
    while steps[-1] * 2 < num_train:
        steps.append(steps[-1] * 2)
    return [*steps, num_train]


def more_images_pay(prev_acc: float, acc: float, num_val: int) -> bool:
    """Whether the last doubling paid: the val error fell by a tenth or more, and by two val images at least."""
    return (acc - prev_acc) * num_val >= 2 and (1 - acc) <= 0.9 * (1 - prev_acc)


def learning_order(samples: list[Sample], seed: int) -> list[Sample]:
    """The samples in a seeded order whose every prefix holds the classes in proportion."""
    gen = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    keyed = []
    for label, group in sorted(by_class.items()):
        order = torch.randperm(len(group), generator=gen).tolist()
        keyed.extend(((rank + 0.5) / len(group), label, group[i]) for rank, i in enumerate(order))
    return [s for _, _, s in sorted(keyed, key=lambda k: (k[0], k[1]))]


def candidates(views: int, head_features: str = "auto") -> list[HeadChoice]:
    """Every head worth trying: the plain view and all views; final and every stage's features
    (`head_features` final or multi keeps one kind)."""
    view_counts = [1] if views == 1 else [1, views]
    kinds = {"auto": (False, True), "final": (False,), "multi": (True,)}[head_features]
    return [HeadChoice(v, m) for v in view_counts for m in kinds]


def pooled_features(rows: FeatureSet, all_dim: int) -> FeatureSet:
    """Every stage's pooled features: the rows without the tail's activation in front (Classifier.rows)."""
    dim = rows.train.shape[-1]
    if dim == all_dim:
        return rows
    cols = slice(dim - all_dim, dim)
    return FeatureSet(narrow(rows.train, rows.train.shape[1], cols), rows.train_labels,
                      narrow(rows.val, 1 if rows.on_disk else None, cols), rows.val_labels)


def head_features(features: FeatureSet, choice: HeadChoice, final_dim: int) -> FeatureSet:
    """The columns and views of the cached features that a head of this choice reads."""
    dim = features.train.shape[-1]
    cols = slice(0, dim) if choice.multi_layer else slice(dim - final_dim, dim)
    return FeatureSet(narrow(features.train, choice.views, cols), features.train_labels,
                      narrow(features.val, 1 if features.on_disk else None, cols), features.val_labels)


class _HeadOnly(nn.Module):
    """A scratch model for a candidate head: its best-epoch copies are tiny."""

    def __init__(self, feature_norm: FeatureNorm, head: nn.Module):
        super().__init__()
        self.feature_norm, self.head = feature_norm, head


def choose_head(features: FeatureSet, model: Classifier, split: DatasetSplit, pp: Preprocessing, loss: LossFn,
                cfg: TrainConfig, device: torch.device, views: int, known: dict[HeadChoice, ResumeState] | None = None,
                reporter: Reporter | None = None) -> tuple[HeadChoice, list[dict], ResumeState]:
    """Train each candidate head on the cached features; the best on val wins. Returns it, every
    candidate's validation figures and the state the winner's training ended in. Each candidate
    trains as the run's head stage would (from `torch.manual_seed(cfg.seed)`, on the same
    features), so the winner is the head stage: the run adopts it rather than training it again
    (Run.adopt_head sets every random stream as the winner left it; here only the caller's CPU
    stream is left as it was). `known`: candidates already trained on these very features (the
    last growth step's). `reporter`: where each candidate's progress bar goes."""
    known = known or {}
    kinds = candidates(views, cfg.head_features if model.chain is not None else "final")
    todo = [choice for choice in kinds if choice not in known]  # (the bars count the heads trained here)
    fresh = {choice: try_head(features, choice, model, split, pp, loss, cfg, device, reporter, f"Head {i} of {len(todo)}")
             for i, choice in enumerate(todo, 1)}
    trained = {choice: fresh[choice] if choice in fresh else known[choice] for choice in kinds}
    scores = [{**choice.to_dict(), "val_acc": head.best_acc, "val_loss": head.best_loss, "epoch": head.best_epoch}
              for choice, head in trained.items()]
    winner = best_candidate(scores)
    return winner, scores, trained[winner]


class _LastState(RunFolder):
    """A candidate head's run folder: writes nothing, keeps the resume state of its last epoch."""

    def __init__(self) -> None:
        super().__init__(Path("."), writes=False)
        self.state: ResumeState | None = None

    def save_state(self, state: ResumeState, history: list[EpochRecord]) -> None:
        self.state = state


class _BarsOnly(Reporter):
    """Relays a candidate's progress bar to the run's reporter, and nothing else: its epochs are
    not the run's (until it is adopted)."""

    def __init__(self, to: Reporter):
        self.to = to

    def start(self, description: str, total: int | None) -> None:
        self.to.start(description, total)

    def advance(self, steps: int = 1, **fields: float | str) -> None:
        self.to.advance(steps, **fields)

    def finish(self) -> None:
        self.to.finish()


def try_head(features: FeatureSet, choice: HeadChoice, model: Classifier, split: DatasetSplit, pp: Preprocessing,
             loss: LossFn, cfg: TrainConfig, device: torch.device, reporter: Reporter | None = None,
             title: str | None = None) -> ResumeState:
    """Train a scratch head of this choice on the cached features, as the run's head stage would
    (seed, epochs, features). Returns the resume state its last epoch left (its kept epoch's val
    figures in `best_*`), which the run adopts as its head stage if it wins (fit.Run.adopt_head).
    `reporter` and `title`: its progress bar (None: none)."""
    chosen = head_features(features, choice, model.final_dim)
    dim = chosen.train.shape[-1]
    norm = FeatureNorm(dim).to(device)
    if choice.multi_layer:
        mean, std = norm_statistics(chosen.train)
        norm.mean.copy_(mean), norm.std.copy_(std)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        scratch = _HeadOnly(norm, new_head_module(dim, len(split.classes), model.head[0].p)).to(device)
        folder = _LastState()
        run = Run(cfg, scratch, split, pp, folder, _BarsOnly(reporter) if reporter is not None else Reporter(), "")
        stage = head_stage(scratch, chosen, loss, cfg, device)
        stage.title = title or stage.title
        fit_stage(stage, run)
    return folder.state


def best_candidate(scores: list[dict]) -> HeadChoice:
    """The candidate with the best val accuracy; on a tie, the lower val loss; then the first listed."""
    best = max(range(len(scores)), key=lambda i: (scores[i]["val_acc"], -scores[i]["val_loss"], -i))
    return HeadChoice(scores[best]["views"], scores[best]["multi_layer"])



def epochs_text(n: int) -> str:
    return f"{n} epoch{'' if n == 1 else 's'}"


def fit_in_budget(most: int, epoch_seconds: float, budget_s: float, why: str) -> tuple[int, str]:
    """As many epochs as fit in what the run has left of --time-budget, at most `most`, and why
    (`why`: the reason for the stage so far)."""
    epochs = min(most, int(budget_s // epoch_seconds))
    if not epochs:
        return 0, f"{why}, but an epoch would take {about(epoch_seconds)}: the time budget has {budget_s:.0f} s left"
    return epochs, f"{why}: {about(epoch_seconds)} an epoch, in the time budget's {budget_s:.0f} s left"


def plan_tail(requested: int | None, unavailable: str | None, head_train_acc: float | None, multi_layer: bool,
              epoch_seconds: float | None, head_val_acc: float = 0.0, budget_s: float | None = None) -> tuple[int, str]:
    """Epochs of the tail stage, and why. `unavailable`: why the run kept no activations for it
    (None: it did); `head_train_acc`: the trained head's accuracy on its training images (plain
    view); `multi_layer`: whether every stage's features won the head's choice; `epoch_seconds`:
    a tail epoch's time, from the throughput measured on this device; `head_val_acc`: the head's
    best val accuracy (at 1.0 no tail epoch could be kept for a better one); `budget_s`: what the
    run has left of --time-budget (None: no budget, TAIL_BUDGET_S caps the stage)."""
    if requested is not None:
        return requested, "as asked by --tail-epochs"
    if unavailable:
        return 0, unavailable
    if head_val_acc >= 1.0:
        return 0, "the head is right on every val image: nothing a tail could show better"
    if head_train_acc < TAIL_FIT:
        why = f"the head fits only {head_train_acc:.1%} of its training images"
    elif multi_layer:
        why = "every stage's features beat the final ones on val, a sign the images are unlike ImageNet's"
    else:
        return 0, f"the head fits {head_train_acc:.1%} of its training images on the final features: nothing to gain"
    if budget_s is not None:
        return fit_in_budget(TAIL_EPOCHS, epoch_seconds, budget_s, why)
    cost = TAIL_EPOCHS * epoch_seconds
    if cost > TAIL_BUDGET_S:
        return 0, (f"{why}, but {TAIL_EPOCHS} epochs of the last blocks would take about {cost:.0f} s here (over "
                   f"{TAIL_BUDGET_S:.0f} s): --tail-epochs {TAIL_EPOCHS} or --time-budget runs them")
    return TAIL_EPOCHS, f"{why}: the last blocks train with it ({about(epoch_seconds)} an epoch here)"


def plan_finetune(requested: int | None, val_acc: float, images_per_s: float | None, epoch_seconds: float | None,
                  budget_s: float | None = None) -> tuple[int, str]:
    """Epochs of whole-network fine-tuning, and why. `val_acc`: the kept model's so far;
    `images_per_s`: training images a second of the whole network on this device (decoding
    included where it is the slower), None where it was not measured (a CPU without a time
    budget); `epoch_seconds`: an epoch's time at that pace, its val pass included; `budget_s`:
    what the run has left of --time-budget once the test split is measured (None: no budget)."""
    if requested is not None:
        return requested, "as asked by --finetune-epochs" if requested else "as asked (--finetune-epochs 0 or --freeze-backbone)"
    if val_acc >= 1.0:
        return 0, "the model is right on every val image: nothing fine-tuning could show better"
    if images_per_s is None:
        return 0, (f"a CPU trains the whole network at some images a second: --finetune-epochs {FINETUNE_EPOCHS} "
                   "or --time-budget runs it")
    pace = f"the whole network trains at about {images_per_s:.0f} images/s here"
    if budget_s is not None:
        return fit_in_budget(MAX_BUDGETED_FINETUNE_EPOCHS, epoch_seconds, budget_s, pace)
    cost = FINETUNE_EPOCHS * epoch_seconds
    if images_per_s < FAST_TRAINING_RATE or cost > FINETUNE_BUDGET_S:
        return 0, f"{pace}: {FINETUNE_EPOCHS} epochs would take about {cost:.0f} s (--finetune-epochs {FINETUNE_EPOCHS} runs them)"
    return FINETUNE_EPOCHS, f"{pace} ({cost:.0f} s for {FINETUNE_EPOCHS} epochs)"
