"""Temperature scaling on few val images, simulated: the likelihood alone (MLE) against
calibration.fit_temperature (a Gaussian prior on log T).

Logits of a model whose true temperature is known (labels drawn from softmax(logits / T)); T is
fitted on n val images and judged on 4,000 others (their NLL and ECE), 200 draws each.

    python benchmarks/sim_temperature.py [--draws 200]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from finetune.calibration import fit_temperature  # noqa: E402
from finetune.metrics import calibration  # noqa: E402


def draw(n: int, classes: int, true_t: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.randn(n, classes, generator=g) * 3.0
    return logits, torch.multinomial((logits / true_t).softmax(1), 1, generator=g).squeeze(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=200)
    args = ap.parse_args()
    for n in (3, 24, 60, 200, 800):
        for true_t in (0.5, 1.0, 2.0):
            for classes in (2, 10):
                row = {"val_images": n, "true_t": true_t, "classes": classes}
                for name, fit in (("mle", lambda l, y: fit_temperature(l, y, prior_sd=None)), ("prior", fit_temperature)):
                    nll = ece = 0.0
                    for i in range(args.draws):
                        g = torch.Generator().manual_seed(i)
                        val, held_out = draw(n, classes, true_t, g), draw(4000, classes, true_t, g)
                        t = fit(*val)
                        nll += float(F.cross_entropy(held_out[0] / t, held_out[1])) / args.draws
                        ece += calibration((held_out[0] / t).softmax(1), held_out[1].tolist())["ece"] / args.draws
                    row[name] = {"nll": round(nll, 4), "ece": round(ece, 4)}
                print(json.dumps(row))


if __name__ == "__main__":
    main()
