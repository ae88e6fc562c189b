"""Features of the frozen backbone, computed once per image: the training images in `views`
views (view 0 the plain centre crop, the others augmented), the val images in their plain
view. Decoding each image for this is also the bad-file check: what fails is skipped.
Rows already in the feature cache (cache.py) are read, not computed: the files they come
from decoded before, with the same bytes.

Under torchrun each rank computes its share and every rank gets all the features, so that
every image is decoded once in all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from .cache import FeatureCache, cache_root, row_id
from .config import TrainConfig
from .data import DatasetSplit, ImageFileDataset, Preprocessing, Sample, make_loader, view_seed
from .device import autocast, autocast_dtype, forward_in_chunks, to_model_input
from .distributed import Dist
from .fold import folded, probe_images
from .models import Classifier
from .progress import Reporter
from .store import DiskRows, Rows, keep, new_rows, put, put_view


@dataclass
class FeatureSet:
    train: Rows  # [images, views, dim], fp16 on the CPU: half the memory, ample for a linear head
    train_labels: torch.Tensor
    val: Rows  # [images, dim] in memory; [images, 1, dim] in a file (store.DiskRows)
    val_labels: torch.Tensor

    @property
    def on_disk(self) -> bool:
        return isinstance(self.train, DiskRows)


@dataclass
class FeatureExtractor:
    model: Classifier
    pp: Preprocessing
    cfg: TrainConfig
    device: torch.device
    d: Dist
    reporter: Reporter
    cache: FeatureCache | None = None  # None: --no-cache
    on_disk: bool = field(default=False, init=False)  # the table is too big for memory: in a file (store.py)
    computed: int = field(default=0, init=False)  # image views through the backbone (decoding overlapped), and their time
    compute_seconds: float = field(default=0.0, init=False)
    _net: Classifier | None = field(default=None, init=False, repr=False)  # frozen_net, once made

    def pass_summary(self) -> dict:
        """What computing features took in this run (results.json `recipe.feature_pass`)."""
        rate = round(self.computed / self.compute_seconds, 1) if self.computed else None
        return {"image_views": self.computed, "seconds": round(self.compute_seconds, 2), "image_views_per_s": rate}

    def frozen_net(self):
        """The model for the pass, its BatchNorms folded into their convolutions (fold.py): nothing
        in it trains while the features are computed."""
        if self._net is None:
            self._net = folded(self.model, probe_images(self.pp.img_size, self.device), lambda net, x: net.rows(x))
        return self._net.eval()

    def features_of(self, split: DatasetSplit, views: int) -> tuple[FeatureSet, DatasetSplit]:
        """The rows of every image view (Classifier.rows: every stage's features, after the activation
        entering the tail when the model keeps it), and the split without
        the images that failed to decode (they are added to its `skipped` list and reported)."""
        size = (len(split.train) * views + len(split.val)) * self.model.row_dim * 2
        self.on_disk = not self.d.active and size > self.cfg.feature_memory_gb * 1e9  # (ranks exchange tensors)
        train, train_feats, train_failed = self.sharded(split.train, views, "Features (train)")
        val, val_feats, val_failed = self.sharded(split.val, 1, "Features (val)")
        clean = replace(split, train=train, val=val, skipped=[*split.skipped, *train_failed, *val_failed])
        labels = lambda samples: torch.tensor([s.label for s in samples], dtype=torch.long)  # noqa: E731
        return FeatureSet(train_feats, labels(train), val_feats if self.on_disk else val_feats[:, 0], labels(val)), clean

    def sharded(self, samples: list[Sample], views: int, description: str) -> tuple[list[Sample], Rows, list[dict]]:
        """(decoded samples, their features, {path, reason} of the others), each rank computing its share."""
        mine = self.d.shard(list(range(len(samples))))
        kept, feats, failed = self.extract([samples[i] for i in mine], views, description)
        kept_all, feats_all = self.d.gather_in_order([mine[i] for i in kept], feats) if self.d.active else (kept, feats)
        failures = []
        for i, reason in sorted(f for part in self.d.all_gather([(mine[i], reason) for i, reason in failed]) for f in part):
            failures.append({"path": str(samples[i].path), "reason": reason})
            self.reporter.warn(f"skipped {samples[i].path}: {reason}")
        return [samples[i] for i in kept_all], feats_all, failures

    def extract(self, samples: list[Sample], views: int, description: str) -> tuple[list[int], Rows, list[tuple[int, str]]]:
        """The features [n, views, dim] of the samples that decode, in index order: from the
        cache where it has them, computed for the rest; (index, reason) of the others."""
        ids = [[row_id(s, v, self.cfg.seed) for v in range(views)] for s in samples]
        folder = cache_root(self.cfg.cache_dir) / "tmp"
        out = new_rows(len(samples), views, self.model.row_dim, self.on_disk, folder)
        found = self.cache.lookup(ids, out, [s.path for s in samples]) if self.cache is not None else {}
        cached = [i for i, have in found.items() if len(have) == views]
        todo = [i for i in range(len(samples)) if len(found.get(i, ())) < views]
        self.reporter.start(description, len(samples))
        self.reporter.advance(len(cached))
        try:
            done, failed = self.compute([samples[i] for i in todo], views, [ids[i] for i in todo], out, todo,
                                        [found.get(i, set()) for i in todo])
        finally:
            if self.cache is not None:  # also when interrupted: the next run goes on from here
                self.cache.flush()
            self.reporter.finish()
        kept = sorted([*cached, *(todo[k] for k in done)])
        return kept, keep(out, kept), [(todo[k], reason) for k, reason in failed]

    @torch.inference_mode()
    def compute(self, samples: list[Sample], views: int, ids: list[list[str | None]], out: Rows,
                places: list[int], have: list[set[int]]) -> tuple[list[int], list[tuple[int, str]]]:
        """Decode each image once and run its `views` crops through the frozen backbone, the
        features of samples[k] going to out[places[k]]: the indices k of the decoded samples,
        (k, reason) of the others. The views in have[k] are in out already (from the cache):
        they are not run again."""
        if not samples:  # all from the cache: no loader, no folded network, no transforms (torchvision: 1.6 s)
            return [], []
        seeds = [view_seed(self.cfg.seed, s) for s in samples] if views > 1 else None
        dataset = ImageFileDataset([s.path for s in samples], self.pp, self.cfg.max_pixels, views=views, seeds=seeds)
        loader = make_loader(dataset, max(1, self.cfg.batch_size // views), self.cfg.workers,
                             pin_memory=self.device.type == "cuda", seed=self.cfg.seed)
        amp = autocast_dtype(self.device)
        net = self.frozen_net()
        kept, failures = [], []
        t0, done, computed = time.perf_counter(), 0, 0
        for indices, batch, failed in loader:
            failures.extend(failed)
            if batch is not None:
                b, v = batch.shape[:2]
                need = torch.tensor([[view not in have[k] for view in range(v)] for k in indices])  # [b, v]
                every = bool(need.all())
                x = to_model_input(batch.flatten(0, 1) if every else batch[need], self.device)
                with autocast(self.device, amp):
                    f = forward_in_chunks(net.rows, x, self.device, amp).to("cpu", torch.float16)
                if every:
                    f = f.view(b, v, -1)
                else:  # (the cached views' places stay zero here: out has them, and the cache is not given them again)
                    f = torch.zeros(b, v, f.shape[-1], dtype=f.dtype).index_put_((need,), f)
                for k, row, wanted in zip(indices, f, need):
                    if wanted.all():
                        put(out, places[k], row)
                    else:  # (its other views came from the cache)
                        for view in wanted.nonzero().flatten().tolist():
                            put_view(out, places[k], view, row[view])
                kept.extend(indices)
                computed += len(x)
                if self.cache is not None:
                    self.cache.add([[rid if new else None for rid, new in zip(ids[k], wanted.tolist())]
                                    for k, wanted in zip(indices, need)], f, [samples[k].path for k in indices])
            done += len(indices) + len(failed)
            # (images, as the bar counts them, not image views: with 4 views the figure read 4 times the pace)
            self.reporter.advance(len(indices) + len(failed), images_per_s=round(done / (time.perf_counter() - t0), 1))
        self.computed += computed
        self.compute_seconds += time.perf_counter() - t0
        return kept, failures
