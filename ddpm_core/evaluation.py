"""Judging generated digits: two MNIST classifiers, FID in each one's feature space, accuracy.

No Inception network: its weights would have to be downloaded, and its ImageNet
features say little about 28×28 digits. FID here is the formula of torchmetrics'
FrechetInceptionDistance with the classifier's penultimate layer as `feature=`, the
convention of the diffusion-on-MNIST literature. Its values are therefore on this
classifier's scale: compare them with the real-data floor computed beside them.

One feature space is not a safe instrument: two independently built MNIST classifiers
were seen to disagree 2× on FID-over-floor for the same samples. So there are two, built
apart: `Classifier` (VGG-style, BatchNorm, a BatchNorm-ed 128-d bottleneck) and
`ResidualClassifier` (residual blocks without any normalisation, strided convolutions, a
256-d linear feature layer), each trained with its own seed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ddpm_core import fidelity
from ddpm_core.data import NUM_CLASSES, ImageSet
from ddpm_core.files import load_safe, load_state_checked
from ddpm_core.pixels import histogram_tv, zero_share

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


class Classifier(nn.Module):
    """A small VGG-style CNN; `features()` is the 128-d penultimate layer used for FID."""

    num_features = 128

    def __init__(self):
        super().__init__()

        def block(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.body = nn.Sequential(
            *block(1, 32), nn.MaxPool2d(2),
            *block(32, 64), *block(64, 64), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, self.num_features, bias=False), nn.BatchNorm1d(self.num_features), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(self.num_features, NUM_CLASSES))

    @staticmethod
    def normalize(images: torch.Tensor) -> torch.Tensor:
        """uint8 [0, 255] or float [0, 1] images → the standardised network input."""
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        return (x - MNIST_MEAN) / MNIST_STD

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalize(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class _Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResidualClassifier(nn.Module):
    """The second judge, built unlike `Classifier`: residual blocks with SiLU at 28, 14 and 7
    pixels, strided convolutions between them, no normalisation and no pooling anywhere, and
    a 256-d linear layer whose outputs (before the SiLU of the head) are the features.

    Without normalisation the features keep the images' contrast: with GroupNorm in the
    blocks, Gaussian noise of σ = 0.2 moved FID only 1.5× its floor (6× without), and a
    blur of σ = 1.5 pixels 2.5× (7× without)."""

    num_features = 256

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), _Residual(16),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), _Residual(32),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), _Residual(64),
            nn.SiLU(), nn.Flatten(), nn.Linear(64 * 7 * 7, self.num_features),
        )  # fmt: skip
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(self.num_features, NUM_CLASSES))

    normalize = staticmethod(Classifier.normalize)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalize(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


Judge = Classifier | ResidualClassifier  # the two feature spaces of FID
ARCHITECTURES: dict[str, type[Judge]] = {"vgg": Classifier, "residual": ResidualClassifier}


def train_classifier(
    train: ImageSet,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device,
    architecture: str = "vgg",
    desc: str | None = None,
) -> Judge:
    """AdamW with a one-cycle schedule and random shifts of up to 2 pixels; `architecture`
    is a key of `ARCHITECTURES`, `desc` the progress bar's name."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ARCHITECTURES[architecture]().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = math.ceil(len(train) / batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps)
    name = desc or f"{architecture} evaluator"
    bar = tqdm(total=epochs * steps, desc=name, unit="step", mininterval=1.0)
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(train), generator=generator)
        bar.set_description(f"{name} epoch {epoch}/{epochs}")
        for step in range(steps):
            idx = order[step * batch_size : (step + 1) * batch_size]
            images = random_shift(train.images[idx], generator).to(device)
            loss = F.cross_entropy(model(images), train.labels[idx].to(device), label_smoothing=0.05)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.update()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval()


def random_shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Shift each image by its own random offset of up to `max_shift` pixels (zero fill).

    torchvision's batched transforms draw one offset per batch, hence this loop.
    """
    size = images.shape[-1]
    padded = F.pad(images, (max_shift,) * 4)
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2, images.shape[0]), generator=generator).tolist()
    return torch.stack([p[:, y : y + size, x : x + size] for p, x, y in zip(padded, dx, dy, strict=True)])


@torch.inference_mode()
def predict(classifier: nn.Module, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Predicted class of each uint8 image (N, 1, 28, 28)."""
    device = next(classifier.parameters()).device
    classifier.eval()
    return torch.cat([classifier(chunk.to(device)).argmax(1).cpu() for chunk in images.split(batch_size)])


def accuracy(predicted: torch.Tensor, target: torch.Tensor) -> tuple[float, dict[int, float]]:
    """Overall accuracy and the accuracy within each target class present."""
    correct = predicted == target
    per_class = {int(c): correct[target == c].float().mean().item() for c in target.unique().tolist()}
    return correct.float().mean().item(), per_class


CLASS_BALANCE_GATE = 0.03  # no default may leave a predicted class further than 3 points from 10 %


def class_histogram(predicted: torch.Tensor) -> tuple[list[float], float]:
    """Fraction of images predicted as each class, and the largest |fraction − 1/10|."""
    fractions = torch.bincount(predicted, minlength=NUM_CLASSES).double() / predicted.numel()
    return fractions.tolist(), (fractions - 1 / NUM_CLASSES).abs().max().item()


class FeatureFID:
    """FID against one fixed reference set, in the classifier's feature space.

    The reference's features and statistics are computed once (`fidelity.FrechetReference`);
    `score(images)` compares any number of image sets with them. The formula is torchmetrics'
    `FrechetInceptionDistance` with the classifier as `feature=` (tests/test_fidelity.py
    holds them equal), computed through a symmetric eigenproblem: milliseconds instead of
    the second its general eigensolver takes on a 256-d covariance."""

    def __init__(self, classifier: Judge, reference: torch.Tensor, batch_size: int = 1000):
        self.classifier, self.batch_size = classifier, batch_size
        self.reference = self.features(reference)
        self.frechet = fidelity.FrechetReference(self.reference)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The classifier's features of uint8 images, as `judge_features`."""
        return judge_features(self.classifier, images, self.batch_size)

    def score(self, images: torch.Tensor) -> float:
        """FID between uint8 images (N, 1, 28, 28) and the reference set."""
        return max(0.0, self.frechet.distance(self.features(images)))


def judge_images(
    classifier: nn.Module, fid: FeatureFID, images: torch.Tensor, labels: torch.Tensor | None = None
) -> dict:
    """One judge's view of one set of uint8 images: `fid` (against `fid`'s reference), the
    predicted classes' `class_fractions` and `max_class_deviation` (largest |fraction − 1/10|),
    and with `labels`, `accuracy` and `accuracy_per_class` (the judge agrees with the label).
    The evaluate stage (through `evaluate_samples`) and `SampleScorer` both score this way."""
    predicted = predict(classifier, images)
    fractions, max_deviation = class_histogram(predicted)
    seen = {"fid": fid.score(images), "class_fractions": fractions, "max_class_deviation": max_deviation}
    if labels is not None:
        seen["accuracy"], seen["accuracy_per_class"] = accuracy(predicted, labels)
    return seen


def evaluate_samples(
    classifier: nn.Module,
    fid: FeatureFID,
    train_images: torch.Tensor,
    uncond_images: torch.Tensor,
    cond_images: torch.Tensor,
    cond_labels: torch.Tensor,
    judge: str = "",
) -> dict:
    """FID of both sample sets against `fid`'s reference (the test set), beside the
    real-data floor (the FID of as many real training images); conditional accuracy; the
    unconditional class spread.

    `judge="alt"` names the second judge's numbers: `fid_alt_*`, `cond_accuracy_alt` and
    `uncond_max_class_deviation_alt` (the per-class tables stay the first judge's).
    """
    prefix = f"fid_{judge}" if judge else "fid"
    floor = fid.score(train_images)
    uncond = judge_images(classifier, fid, uncond_images)
    cond = judge_images(classifier, fid, cond_images, cond_labels)
    fids = {
        f"{prefix}_floor": floor,
        f"{prefix}_uncond": uncond["fid"],
        f"{prefix}_cond": cond["fid"],
        f"{prefix}_uncond_over_floor": uncond["fid"] / floor,
        f"{prefix}_cond_over_floor": cond["fid"] / floor,
    }
    if judge:
        return {
            **fids,
            f"cond_accuracy_{judge}": cond["accuracy"],
            f"uncond_max_class_deviation_{judge}": uncond["max_class_deviation"],
        }
    return {
        "num_samples": len(cond_labels),
        **fids,
        "cond_accuracy": cond["accuracy"],
        "cond_accuracy_per_class": {str(c): a for c, a in cond["accuracy_per_class"].items()},
        "uncond_class_fractions": {str(c): f for c, f in enumerate(uncond["class_fractions"])},
        "uncond_max_class_deviation": uncond["max_class_deviation"],
    }


def load_classifier(path: Path, architecture: str, device: torch.device | str = "cpu") -> Judge:
    """A trained judge from its state_dict file, in eval mode; a file that is not that
    architecture's weights is a CheckpointError naming it."""
    remedy = "retrain the judges: `dvc repro --force -s train_evaluator`"
    model = ARCHITECTURES[architecture]()
    load_state_checked(model, load_safe(path, remedy=remedy), str(path), f"the {architecture} judge's weights", remedy)
    return model.to(device).eval()


# The two judges as the train_evaluator stage writes them: metrics-key suffix → (file, architecture).
JUDGES = {"": ("evaluator.pt", "vgg"), "alt": ("evaluator_alt.pt", "residual")}


def load_judges(models_dir: Path, device: torch.device | str = "cpu") -> dict[str, Judge]:
    """Both trained judges from `models_dir`, keyed as `JUDGES` ("" and "alt")."""
    return {name: load_classifier(Path(models_dir) / file, arch, device) for name, (file, arch) in JUDGES.items()}


class SampleScorer:
    """Scores any set of uint8 images (N, 1, 28, 28) as the evaluate stage scores its samples:
    in each judge's space, FID against the real test images beside the floor for N (the FID
    of the first N real training images, cached per N), the class spread and, with labels,
    the accuracy; and the pixel statistics against the first N test images, as the stage
    takes them (ddpm_core.pixels). For benchmarks/score.py: any .npz of `save_samples`.

    Keys of `score()` (judge "alt" adds `_alt` after the first word): num_samples, fid,
    fid_floor, fid_over_floor, max_class_deviation, accuracy (with labels); zero_pixels,
    zero_pixels_real, pixel_hist_tv, and pixel_hist_tv_floor (the same TV distance for the
    N real training images: what real digits score).
    """

    def __init__(self, judges: dict[str, Judge], test_images: torch.Tensor, train_images: torch.Tensor):
        self.judges = judges
        self.fids = {name: FeatureFID(classifier, test_images) for name, classifier in judges.items()}
        self.test_images, self.train_images = test_images, train_images
        self._floors: dict[int, dict[str, float]] = {}

    def floors(self, n: int) -> dict[str, float]:
        """{judge: FID of the first `n` real training images}."""
        if n not in self._floors:
            self._floors[n] = {name: fid.score(self.train_images[:n]) for name, fid in self.fids.items()}
        return self._floors[n]

    def score(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        n = len(images)
        scores: dict = {"num_samples": n}
        for name, classifier in self.judges.items():
            suffix = f"_{name}" if name else ""
            seen = judge_images(classifier, self.fids[name], images, labels)
            floor = self.floors(n)[name]
            scores[f"fid{suffix}"] = seen["fid"]
            scores[f"fid{suffix}_floor"] = floor
            scores[f"fid{suffix}_over_floor"] = seen["fid"] / floor
            scores[f"max_class_deviation{suffix}"] = seen["max_class_deviation"]
            if labels is not None:
                scores[f"accuracy{suffix}"] = seen["accuracy"]
        real = self.test_images[:n]
        scores["zero_pixels"] = zero_share(images)
        scores["zero_pixels_real"] = zero_share(real)
        scores["pixel_hist_tv"] = histogram_tv(images, real)
        scores["pixel_hist_tv_floor"] = histogram_tv(self.train_images[:n], real)
        return scores


@torch.inference_mode()
def judge_features(classifier: Judge, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """The judge's FID features (N, d) of uint8 images, in float64 on the CPU: what its
    `FeatureFID` compares."""
    device = next(classifier.parameters()).device
    classifier.eval()
    return torch.cat(
        [classifier.features(chunk.to(device).float() / 255).double().cpu() for chunk in images.split(batch_size)]
    )


PR_K = 3  # k of the k-NN radii of precision and recall (Kynkäänniemi et al.'s choice)
MEMORIZATION_QUANTILE = 0.01  # of held-out real digits' nearest-training-image distances
RESAMPLES = 200  # bootstrap resamples of each interval


def ci95(low_high: tuple[float, float]) -> dict[str, float]:
    """An interval as metrics hold it: {"low": …, "high": …}. DVC leaves list-valued metrics
    out of `dvc exp show`; a dict shows as two columns, `<name>_ci95.low` and `.high`."""
    return {"low": low_high[0], "high": low_high[1]}


class FidelityJudge(FeatureFID):
    """One judge's reference for the numbers beyond FID: the features and Gaussian statistics
    of the whole real test set (FID's and KID's reference), whose first N also stand for the
    real manifold of precision and recall; `resamples` bootstrap draws per interval."""

    def __init__(self, classifier: Judge, test_images: torch.Tensor, resamples: int = RESAMPLES):
        super().__init__(classifier, test_images)
        self.resamples = resamples

    def fid_ci(self, features: torch.Tensor, generator: torch.Generator) -> dict[str, float]:
        """95 % interval of FID against the test set, resampling the samples (bias-corrected)."""
        return ci95(
            fidelity.bootstrap_ci(
                lambda idx: self.frechet.distance(features[idx]),
                len(features), generator, self.resamples, estimate=self.frechet.distance(features),
            )
        )  # fmt: skip

    def kid_ci(self, features: torch.Tensor, estimate: float, generator: torch.Generator) -> dict[str, float]:
        """95 % interval of KID against the test set, resampling the samples against one
        subset of the test set (bias-corrected, centred on `estimate`)."""
        resampled = fidelity.kid_resampler(self.reference, features, generator)
        return ci95(fidelity.bootstrap_ci(resampled, len(features), generator, self.resamples, estimate=estimate))

    def accuracy_ci(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> dict[str, float]:
        return ci95(fidelity.mean_ci(predict(self.classifier, images) == labels, generator, self.resamples))


def fidelity_metrics(
    judges: dict[str, FidelityJudge],
    floor_images: torch.Tensor,
    samples: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
    seed: int = 0,
) -> dict:
    """KID, precision and recall in each judge's space, and a 95 % interval for each, and for
    FID and accuracy, of each sample set ({"uncond": (images, None), "cond": (images,
    labels)}). Keys as `fid_*`: `kid_cond`, `kid_alt_cond`, `precision_cond`,
    `recall_alt_uncond`, …, each `<name>_ci95: {low, high}`; `kid_floor` (`floor_images`,
    real training images as many as the samples, against the test set) and
    `precision_floor`/`recall_floor` (the same images, as samples).

    Precision and recall take as many test images as there are floor images as the real set
    (k = PR_K). Everything is drawn from a generator seeded with `seed`: the same samples
    give the same numbers."""
    generator = torch.Generator().manual_seed(seed)
    metrics: dict[str, Any] = {}
    num_real = len(floor_images)
    for name, judge in judges.items():
        s = f"_{name}" if name else ""
        classifier = judge.classifier
        real = judge.reference[:num_real]
        floor = judge_features(classifier, floor_images)
        metrics[f"kid{s}_floor"] = fidelity.kid(judge.reference, floor, generator)
        p, r = fidelity.precision_recall(real, floor, PR_K)
        metrics[f"precision{s}_floor"], metrics[f"recall{s}_floor"] = p.double().mean().item(), r.double().mean().item()
        for kind, (images, labels) in samples.items():
            fake = judge_features(classifier, images)
            metrics[f"fid{s}_{kind}_ci95"] = judge.fid_ci(fake, generator)
            metrics[f"kid{s}_{kind}"] = fidelity.kid(judge.reference, fake, generator)
            metrics[f"kid{s}_{kind}_ci95"] = judge.kid_ci(fake, metrics[f"kid{s}_{kind}"], generator)
            in_real, in_fake = fidelity.precision_recall(real, fake, PR_K)
            for metric, inside in (("precision", in_real), ("recall", in_fake)):
                metrics[f"{metric}{s}_{kind}"] = inside.double().mean().item()
                metrics[f"{metric}{s}_{kind}_ci95"] = ci95(fidelity.mean_ci(inside, generator, judge.resamples))
            if labels is not None:
                metrics[f"{kind}_accuracy{s}_ci95"] = judge.accuracy_ci(images, labels, generator)
    return metrics


def memorization(
    test_images: torch.Tensor,
    train_images: torch.Tensor,
    samples: dict[str, torch.Tensor],
    num_real: int,
    seed: int = 0,
    resamples: int = RESAMPLES,
    closest: int = 10,
) -> tuple[dict, list[dict]]:
    """Which samples ({"uncond": images, "cond": images}) are copies of a training image: the
    share whose nearest training image (pixel L2, all of `train_images`) is closer than
    `memorization_threshold`, the MEMORIZATION_QUANTILE of the first `num_real` held-out test
    images' nearest-training-image distances (`memorized_<kind>`, with `_ci95`).

    Also the `closest` samples of all sets nearest to a training image, closest first: rows of
    model, sample (its index in its set), train_index, distance and copy (below the threshold)."""
    generator = torch.Generator().manual_seed(seed)
    held_out, _ = fidelity.nearest_neighbours(test_images[:num_real], train_images)
    threshold = fidelity.memorization_threshold(held_out, MEMORIZATION_QUANTILE)
    metrics: dict[str, Any] = {"memorization_threshold": threshold}
    rows = []
    for kind, images in samples.items():
        distances, indices = fidelity.nearest_neighbours(images, train_images)
        copies = distances < threshold
        metrics[f"memorized_{kind}"] = copies.double().mean().item()
        metrics[f"memorized_{kind}_ci95"] = ci95(fidelity.mean_ci(copies, generator, resamples))
        rows += [
            {"model": kind, "sample": i, "train_index": int(indices[i]), "distance": float(distances[i])}
            for i in distances.argsort()[:closest].tolist()
        ]
    rows = sorted(rows, key=lambda row: row["distance"])[:closest]
    return metrics, [{**row, "copy": row["distance"] < threshold} for row in rows]


def classification_accuracy_score(
    samples: ImageSet,
    real: ImageSet,
    test: ImageSet,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device,
    resamples: int = RESAMPLES,
) -> dict:
    """Classification Accuracy Score (Ravuri & Vinyals 2019): the first judge's architecture
    trained only on generated digits with the labels they were asked for, tested on real
    ones (`cas_accuracy`), beside the same classifier trained the same way on as many real
    images (`cas_accuracy_real`). Both runs share the recipe of `train_classifier`, `seed`
    (the same initial weights and batch order) and the number of optimizer steps: only the
    training images differ.

    The `_ci95` intervals resample the test images (the classifier's own run-to-run spread
    is not in them: docs/metrics.md measures it)."""
    generator = torch.Generator().manual_seed(seed)
    metrics: dict[str, Any] = {"cas_samples": len(samples)}
    for key, images in (("cas_accuracy", samples), ("cas_accuracy_real", real)):
        desc = "CAS classifier on " + ("generated" if images is samples else "real") + " digits"
        classifier = train_classifier(images, epochs, batch_size, lr, seed, device, "vgg", desc)
        correct = predict(classifier, test.images) == test.labels
        metrics[key] = correct.double().mean().item()
        metrics[f"{key}_ci95"] = ci95(fidelity.mean_ci(correct, generator, resamples))
    return metrics


def sweep_key(guidance: float) -> str:
    """The metrics key of one weight: 3.0 → "w3", 1.5 → "w1.5"."""
    return f"w{guidance:g}"


def evaluate_guidance_sweep(
    classifier: nn.Module,
    fid: FeatureFID,
    train_images: torch.Tensor,
    samples: dict[float, tuple[torch.Tensor, torch.Tensor]],
    fid_alt: FeatureFID | None = None,
    intervals: tuple[dict[str, FidelityJudge], int] | None = None,
) -> dict:
    """Conditional accuracy and FID at each guidance weight ({w: (images, labels)}), with
    the floor for that many images: FID grows as N shrinks, so compare with it. With
    `fid_alt`, also the FID in the second judge's space (`fid_alt`, `fid_alt_floor`). With
    `intervals` = (the judges by name, a seed), each weight's `fid_ci95`, `fid_alt_ci95`
    and `cond_accuracy_ci95` (bootstrap over its samples)."""
    n = len(next(iter(samples.values()))[1])
    sweep: dict[str, Any] = {"num_samples": n, "fid_floor": fid.score(train_images[:n])}
    if fid_alt is not None:
        sweep["fid_alt_floor"] = fid_alt.score(train_images[:n])
    for guidance, (images, labels) in samples.items():
        cond_accuracy, _ = accuracy(predict(classifier, images), labels)
        row: dict[str, Any] = {"guidance": guidance, "cond_accuracy": cond_accuracy, "fid": fid.score(images)}
        if fid_alt is not None:
            row["fid_alt"] = fid_alt.score(images)
        if intervals is not None:
            judges, seed = intervals
            generator = torch.Generator().manual_seed(seed)
            for name, judge in judges.items():
                s = f"_{name}" if name else ""
                row[f"fid{s}_ci95"] = judge.fid_ci(judge_features(judge.classifier, images), generator)
            row["cond_accuracy_ci95"] = judges[""].accuracy_ci(images, labels, generator)
        sweep[sweep_key(guidance)] = row
    return sweep


def sweep_rows(metrics: dict) -> list[dict]:
    """The sweep of a metrics.json as rows (guidance, cond_accuracy, fid), by weight; [] if none."""
    sweep = metrics.get("guidance_sweep", {})
    return sorted((v for v in sweep.values() if isinstance(v, dict)), key=lambda row: row["guidance"])


def autoguidance_key(weight: float) -> str:
    """The metrics key of one autoguidance weight: 2.0 → "a2", 1.5 → "a1.5"."""
    return f"a{weight:g}"


def evaluate_autoguidance_sweep(
    classifier: nn.Module,
    fid: FeatureFID,
    train_images: torch.Tensor,
    samples: dict[float, torch.Tensor],
    fid_alt: FeatureFID | None = None,
    intervals: tuple[dict[str, FidelityJudge], int] | None = None,
) -> dict:
    """FID and class spread of unconditional samples at each autoguidance weight ({a:
    images}), beside the floor for that many real training images (`fid_floor`, and with
    `fid_alt` the second judge's `fid_alt_floor`). Each weight's row, under
    `autoguidance_key(a)`: `autoguidance`, `fid` and `max_class_deviation` (the largest
    |fraction − 1/10| of the classes `classifier` predicts: autoguidance can buy FID by
    dropping hard digits), with `fid_alt` also `fid_alt` and `max_class_deviation_alt` (the
    second judge's classifier). With `intervals` = (the judges by name, a seed), each
    weight's `fid_ci95` and `fid_alt_ci95` (bootstrap over its samples)."""
    if not samples:
        raise ValueError("evaluate_autoguidance_sweep needs at least one weight")
    n = len(next(iter(samples.values())))
    sweep: dict[str, Any] = {"num_samples": n, "fid_floor": fid.score(train_images[:n])}
    if fid_alt is not None:
        sweep["fid_alt_floor"] = fid_alt.score(train_images[:n])
    for weight, images in samples.items():
        _, deviation = class_histogram(predict(classifier, images))
        row: dict[str, Any] = {"autoguidance": weight, "fid": fid.score(images), "max_class_deviation": deviation}
        if fid_alt is not None:
            row["fid_alt"] = fid_alt.score(images)
            row["max_class_deviation_alt"] = class_histogram(predict(fid_alt.classifier, images))[1]
        if intervals is not None:
            judges, seed = intervals
            generator = torch.Generator().manual_seed(seed)
            for name, judge in judges.items():
                s = f"_{name}" if name else ""
                row[f"fid{s}_ci95"] = judge.fid_ci(judge_features(judge.classifier, images), generator)
        sweep[autoguidance_key(weight)] = row
    return sweep


def autoguidance_sweep_rows(metrics: dict) -> list[dict]:
    """The autoguidance sweep of a metrics.json as rows (autoguidance, fid, fid_alt,
    max_class_deviation, …), by weight; [] if none."""
    sweep = metrics.get("autoguidance_sweep", {})
    return sorted((v for v in sweep.values() if isinstance(v, dict)), key=lambda row: row["autoguidance"])
