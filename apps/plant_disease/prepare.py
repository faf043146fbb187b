"""Turns PlantVillage into the layout tlkit reads: image files plus ``manifest.csv`` (path,label).

Three sources, one output::

    # 1. TensorFlow Datasets (needs a network and `pip install tensorflow-datasets`)
    python apps/plant_disease/prepare.py --tfds --out data/plant_village

    # 2. a local copy in PlantVillage layout: <root>/<Crop___Disease>/*.jpg
    #    (e.g. the "color" folder of github.com/spMohanty/PlantVillage-Dataset, raw/color)
    python apps/plant_disease/prepare.py --from-folder ~/PlantVillage/raw/color --out data/plant_village

    # 3. offline smoke path: a few dozen synthetic leaves (see synthetic_leaves.py)
    python apps/plant_disease/prepare.py --sample --out data/plant_disease_sample

The output folder holds ``manifest.csv`` (``path,label``; paths relative to the manifest,
or absolute for ``--from-folder`` without ``--copy``) and, for TFDS and ``--sample``,
``images/<class>/*.jpg``. Labels keep PlantVillage's names (``Tomato___Early_blight``).
``--crops Tomato,Potato`` keeps some crops only; ``--max-per-class N`` caps each class
(deterministic: the first N files in sorted order, or TFDS order).
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
TFDS_HINT = (
    "the --tfds source needs TensorFlow Datasets and a network connection: "
    "`.venv/bin/pip install tensorflow-datasets`, or download PlantVillage yourself and use --from-folder"
)


def _keep(label: str, crops: set[str] | None) -> bool:
    return crops is None or label.split("___")[0].lower() in crops


def from_folder(root: Path, out: Path, crops: set[str] | None, max_per_class: int | None, copy: bool
                ) -> list[tuple[str, str]]:
    """Rows ``(path, label)`` for ``root/<class>/*.jpg``; files are copied only with ``copy``."""
    if not root.is_dir():
        raise SystemExit(f"--from-folder {str(root)!r} is not a folder")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise SystemExit(f"{str(root)!r} has no class sub-folders; expected <root>/<Crop___Disease>/*.jpg")
    rows = []
    for folder in classes:
        if not _keep(folder.name, crops):
            continue
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        for file in files[:max_per_class]:
            if copy:
                target = out / "images" / folder.name / file.name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, target)
                rows.append((target.relative_to(out).as_posix(), folder.name))
            else:
                rows.append((str(file.resolve()), folder.name))
    return rows


def from_tfds(out: Path, crops: set[str] | None, max_per_class: int | None, data_dir: str | None
              ) -> list[tuple[str, str]]:
    """Rows for TFDS ``plant_village`` (54,303 images, 38 classes), written as the original JPEG bytes."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as exc:
        raise SystemExit(TFDS_HINT) from exc
    builder = tfds.builder("plant_village", data_dir=data_dir)
    builder.download_and_prepare()
    names = builder.info.features["label"].names
    # SkipDecoding: keep the JPEG bytes as published (no decode / re-encode loss).
    ds = builder.as_dataset(split="train", decoders={"image": tfds.decode.SkipDecoding()})
    counts: Counter[str] = Counter()
    rows = []
    for index, example in enumerate(tfds.as_numpy(ds)):
        label = names[int(example["label"])]
        if not _keep(label, crops) or (max_per_class and counts[label] >= max_per_class):
            continue
        counts[label] += 1
        original = Path(example["image/filename"].decode("utf-8")).name or f"{index:06d}.jpg"
        target = out / "images" / label / f"{index:06d}_{original}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(example["image"])
        rows.append((target.relative_to(out).as_posix(), label))
    return rows


def from_sample(out: Path, per_class: int, size: int, seed: int) -> list[tuple[str, str]]:
    from synthetic_leaves import write_sample  # beside this script (its folder is on sys.path)

    return write_sample(out, per_class=per_class, size=size, seed=seed)


def write_manifest(out: Path, rows: Iterable[tuple[str, str]]) -> Path:
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tfds", action="store_true", help="download plant_village with TensorFlow Datasets")
    source.add_argument("--from-folder", type=Path, metavar="ROOT", help="a local copy: ROOT/<Crop___Disease>/*.jpg")
    source.add_argument("--sample", action="store_true", help="write a small synthetic set (offline smoke path)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (new or empty)")
    parser.add_argument("--crops", help="comma-separated crops to keep, e.g. Tomato,Potato (default: all)")
    parser.add_argument("--max-per-class", type=int, default=None, help="cap on images per class")
    parser.add_argument("--copy", action="store_true", help="--from-folder: copy files instead of listing them")
    parser.add_argument("--tfds-data-dir", default=None, help="TFDS data_dir (default ~/tensorflow_datasets)")
    parser.add_argument("--per-class", type=int, default=16, help="--sample: images per class")
    parser.add_argument("--size", type=int, default=128, help="--sample: image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="--sample: random seed")
    args = parser.parse_args(argv)

    out: Path = args.out
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--out {str(out)!r} exists and is not empty; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    crops = {c.strip().lower() for c in args.crops.split(",")} if args.crops else None
    if args.sample:
        rows = from_sample(out, args.per_class, args.size, args.seed)
    elif args.tfds:
        rows = from_tfds(out, crops, args.max_per_class, args.tfds_data_dir)
    else:
        rows = from_folder(args.from_folder.expanduser(), out, crops, args.max_per_class, args.copy)
    if not rows:
        raise SystemExit("no images selected; check --crops and the source folder")
    manifest = write_manifest(out, rows)
    counts = Counter(label for _, label in rows)
    print(f"wrote {manifest}: {len(rows)} images, {len(counts)} classes "
          f"(smallest {min(counts.values())}, largest {max(counts.values())} per class)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
