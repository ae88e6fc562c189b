"""What the HTML report (report.py) shows of a training run and of an evaluation, and the
training set's suspected label errors (suspects.py) that a run finds on its cached features."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import LoadedModel
from .records import EvaluationReport, Stage, TrainResult
from .report import Measured, ReportContent, write_report
from .scan import count_labels, count_per_class
from .suspects import FOLDS, MIN_JUDGED_RIGHT, OUTLIER_SHARE, find_suspects, median_likeness, near_copies

SUSPECTS_HOW = (f"Two kinds, found on the cached backbone features. Another class: {FOLDS}-fold cross-validation judges each "
                "training image by heads trained on the other folds; it is a suspect when another class gets at least the "
                "probability that class's own images typically get, and more than its given label. No class: the "
                f"{OUTLIER_SHARE:.0%} of training images least like any other (nearest neighbours in feature space), "
                "which a head may still file confidently under some class. The figure is the out-of-fold probability of "
                "the given label. Full list: suspects.csv.")
MAX_SUSPECT_IMAGES = 50_000


def training_suspects(features, final_dim: int, choice, paths: list[str], classes: list[str],
                      seed: int) -> tuple[list[dict] | None, str]:
    """Suspected label errors among the training images whose features are `features` (the
    FeatureSet of the run, train rows [images, views, dim]; the plain view is used): another
    class on the columns the chosen head reads, no class on the final features."""
    if features.on_disk or len(features.train_labels) > MAX_SUSPECT_IMAGES:
        return None, (f"Not computed: more than {MAX_SUSPECT_IMAGES:,} training images (the cross-validated heads "
                      "would cost minutes).")
    plain = features.train[:, 0]
    read = plain if choice.multi_layer else plain[:, -final_dim:]
    outcome = find_suspects(read, features.train_labels, len(classes), seed, final=plain[:, -final_dim:])
    if outcome is None:
        return None, "Not computed: every class needs at least 2 training images for cross-validation."
    found, judged_right = outcome
    given = features.train_labels.tolist()
    how = SUSPECTS_HOW if judged_right >= MIN_JUDGED_RIGHT else (
        f"{SUSPECTS_HOW} No image is listed as another class's: heads judging images out of fold are right on only "
        f"{judged_right:.0%} of them, too few for their claims to mean a label error.")
    return [{"path": paths[s.index], "given": classes[given[s.index]],
             "suggested": classes[s.suggested] if s.suggested is not None else "",
             "probability": s.probability, "why": "another class" if s.suggested is not None else "unlike the other images"}
            for s in found], how


SAME_PICTURE = 0.95  # the cosine of the two images' 16x16 thumbnails (plain view, each colour less its mean), at
# least. Measured: copies resized to 97% and saved at JPEG 80, 0.997 or more; chest X-rays of one patient taken
# twice 1.0; X-rays of different people 0.55-0.85, bees 0.3 at most; the sample shapes' grids and rings in other
# colours, whose features are as alike as copies' (0.95), 0.002 at most.
MAX_NEAR_COPIES = 1_000  # candidates looked at (each decodes two images)


def same_picture(a: Path, b: Path, pp, max_pixels: int) -> bool:
    """Whether two images are one picture by their pixels: their thumbnails as the model sees them
    (the plain view) are SAME_PICTURE alike or more. What features alone cannot tell from another
    colouring of one pattern."""
    import torch.nn.functional as F

    from .data import ImageFileDataset

    dataset = ImageFileDataset([a, b], pp, max_pixels)
    views = [dataset[i][1] for i in (0, 1)]
    if any(isinstance(v, str) for v in views):  # (one no longer decodes)
        return False
    thumbs = [F.adaptive_avg_pool2d(v[0].float(), 16) for v in views]
    patterns = [(t - t.mean((1, 2), keepdim=True)).flatten() for t in thumbs]  # (each colour's own pattern)
    return float(F.cosine_similarity(patterns[0], patterns[1], dim=0)) >= SAME_PICTURE


def held_out_near_copies(features, final_dim: int, split, pp, max_pixels: int, test_rows=None) -> list[dict] | None:
    """Val (and test) images that look like near-copies of training images: alike in the final
    features of the plain view (suspects.near_copies), then in their pixels (same_picture):
    {path, like, similarity}, in results.json `near_copies`. None where the training features are
    in a file (a large set: not compared)."""
    if features.on_disk or len(features.train_labels) > MAX_SUSPECT_IMAGES:
        return None
    train = features.train[:, 0, -final_dim:]
    sets = [(split.val, features.val[:, -final_dim:])]
    if test_rows is not None:  # (samples, rows [images, 1, row dim], failures): final features last in a row
        sets.append((test_rows[0], test_rows[1][:, 0, -final_dim:]))
    leaked = {entry["path"] for entry in split.leakage}  # (the same bytes: reported as leakage already)
    alike = [(samples[i].path, split.train[j].path, similarity) for samples, rows in sets
             for i, j, similarity in near_copies(train, rows) if str(samples[i].path) not in leaked][:MAX_NEAR_COPIES]
    return [{"path": str(a), "like": str(b), "similarity": round(similarity, 4)}
            for a, b, similarity in alike if same_picture(a, b, pp, max_pixels)]


def likeness_to_training(features, final_dim: int, split, test_rows=None) -> dict | None:
    """How alike val (and test) images are to the training images, against the training images to
    each other (suspects.median_likeness on the final features of the plain view): results.json
    `likeness`. None where near_copies compares nothing, or with under 3 training images."""
    if features.on_disk or len(features.train_labels) > MAX_SUSPECT_IMAGES or len(features.train_labels) < 3:
        return None
    train = features.train[:, 0, -final_dim:]
    held = {"val": features.val[:, -final_dim:] if len(split.val) else None,
            "test": test_rows[1][:, 0, -final_dim:] if test_rows is not None and len(test_rows[0]) else None}
    return {"train": round(median_likeness(train), 3),
            **{name: round(median_likeness(train, rows), 3) if rows is not None else None for name, rows in held.items()}}


def measured_val(run) -> Measured | None:
    """The kept epoch's answers on the val images (a fit.Run), calibrated as predict gives them."""
    logits = run.best.val_logits
    if logits is None or len(logits) != len(run.split.val):
        return None
    t = run.calibration["temperature"] if run.calibration else 1.0
    distance = run.val_distance if run.val_distance is not None and len(run.val_distance) == len(logits) else None
    return Measured("val", [str(s.path) for s in run.split.val], [s.label for s in run.split.val], (logits / t).softmax(1),
                    distance)


def summary_of(m: Measured, classes: list[str]) -> dict:
    """A measured set's figures without the per-image lists (results.json)."""
    from .metrics import classification_report

    figures = classification_report(m.paths, m.labels, m.probs, classes)
    return {k: figures[k] for k in ("accuracy", "balanced_accuracy", "num_images", "per_class", "confusion_matrix", "calibration")}


def training_content(run, result: TrainResult, sets: list[Measured]) -> ReportContent:
    """The report of a finished run (a fit.Run) and its result."""
    split, n = run.split, len(run.split.classes)
    counts = {"train": count_per_class(split.train, n), "val": count_per_class(split.val, n)}
    if split.test:
        counts["test"] = count_per_class(split.test, n)
    head = run.head_choice.describe() if run.head_choice else "n/a"
    finetuned = sum(r.stage is Stage.FINETUNE for r in run.history)
    tail = sum(r.stage is Stage.TAIL for r in run.history)
    summary = [
        ("data", str(run.cfg.data)), ("read as", split.read_as), ("classes", f"{n}: {', '.join(split.classes)}"),
        ("arch", f"{result.arch}, weights: {result.weights}"), ("image size", f"{result.img_size} px"),
        ("strategy", f"a new head on the frozen backbone's features ({head})"
                     + (f", then {tail} epochs of the backbone's last blocks with it" if tail else "")
                     + (f", then {finetuned} epochs fine-tuning the whole network" if finetuned else "")),
        ("device", result.device), ("time", f"{result.seconds:.1f} s"),
        ("kept epoch", f"{result.best_epoch} of {result.epochs}"), ("val accuracy", f"{result.best_val_acc:.4f}"),
        ("test accuracy", f"{result.test_acc:.4f} ({result.num_test:,} images)" if result.test_acc is not None else "no test split"),
        ("model", str(result.model)),
    ]
    settings = {k: v for k, v in run.cfg.to_json_dict().items() if k != "resume"}
    return ReportContent(title=f"finetune run {run.folder.path.name}", classes=split.classes, summary=summary, sets=sets,
                         class_counts=counts, history=run.history, suspects=run.suspects, suspects_note=run.suspects_note,
                         skipped=split.skipped, settings=settings, curves_png=_read(run.folder.path / "curves.png"),
                         temperature=run.calibration["temperature"] if run.calibration else 1.0,
                         distance_threshold=run.unknown["threshold"] if run.unknown else None)


def evaluation_content(report: EvaluationReport, model: LoadedModel) -> ReportContent:
    """The report of `finetune evaluate`: one measured set, no training curves or suspects."""
    m = report.measured
    summary = [("model", str(model.path)), ("data", report.data), ("classes", f"{len(report.classes)}: {', '.join(report.classes)}"),
               ("arch", str(model.meta.get("arch"))), ("image size", f"{model.preprocessing.img_size} px"),
               ("images", f"{report.num_images:,}"), ("accuracy", f"{report.accuracy:.4f}"),
               ("test-time augmentation", "on" if report.tta else "off")]
    counts = {"images": count_labels(m.labels, len(report.classes))} if m is not None else {}
    note = ("Not computed by evaluate: suspected label errors come from a training run's cross-validated heads "
            "(see report.html and suspects.csv in the run folder).")
    return ReportContent(title=f"finetune evaluate: {report.data}", classes=report.classes, summary=summary,
                         sets=[m] if m is not None else [], class_counts=counts, suspects=None, suspects_note=note,
                         skipped=report.skipped, settings=_flat(model.meta), temperature=model.temperature, tta=report.tta,
                         distance_threshold=model.distance_threshold)


GENERATOR_MARK = b'<meta name="generator" content="finetune">'


def check_report_path(path: Path, data: Path | None = None) -> None:
    """Refuse an `evaluate --report` path that is not an HTML file name, is inside DATA, or names a
    file that is not an earlier report (a user's page was replaced)."""
    from .errors import UsageError
    from .runs import refuse_output_inside_input

    if path.suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"--report {path}: a report is an HTML file; name it .html.")
    if path.is_dir():
        raise UsageError(f"--report {path} is a folder; give a file name ending in .html.")
    if data is not None:
        refuse_output_inside_input(path, data, "--report")
    if path.exists() and not written_by_finetune(path):
        raise UsageError(f"--report {path}: a file is there already, not a report finetune wrote; name a new file, "
                         f"or remove that one.")


def written_by_finetune(path: Path) -> bool:
    """Whether an existing file is a report finetune wrote (its mark, or the title earlier reports had)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return GENERATOR_MARK in head or b"<title>finetune " in head


def write_evaluation_report(path: Path, report: EvaluationReport, model: LoadedModel, max_pixels: int,
                            data: Path | None = None) -> dict:
    """`evaluate --report FILE`: the HTML report of this evaluation (report.write_report's figures)."""
    from .errors import UsageError

    check_report_path(path, data)
    try:
        return write_report(path, evaluation_content(report, model), max_pixels)
    except OSError as e:
        raise UsageError(f"--report {path}: cannot write it ({e.strerror or e}). Pass a writable location.") from None


def _read(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def _flat(meta: dict) -> dict:
    """The model file's metadata as key/value rows (nested dicts spelt out one level down)."""
    rows = {}
    for k, v in meta.items():
        if isinstance(v, dict):
            rows.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            rows[k] = v
    return rows
