"""Turns a chest X-ray data set into what tlkit reads: images plus ``manifest.csv``
(``path,label,group`` with the patient as the group, so no patient is in two splits).

Sources::

    # Kermany et al. "chest_xray" (Mendeley / Kaggle): <root>/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg
    python apps/medical_imaging/prepare.py --kermany ~/chest_xray --out data/chest_xray

    # RSNA Pneumonia Detection Challenge: <root>/stage_2_train_images/*.dcm + stage_2_train_labels.csv
    python apps/medical_imaging/prepare.py --rsna ~/rsna-pneumonia --out data/rsna --max-side 512

    # any class folders of DICOM, PNG or JPEG files: <root>/<class>/**/*
    python apps/medical_imaging/prepare.py --from-folder ~/my_cxr --out data/my_cxr

    # offline smoke path: synthetic DICOM files (see synthetic_dicom.py), then as --from-folder
    python apps/medical_imaging/prepare.py --sample --out data/medical_imaging_sample

DICOM files are windowed here (``dicom_io``: modality LUT, then the window given with
``--window-center/--window-width``, else the header's, else the 0.5-99.5 percentile
range; MONOCHROME1 inverted) and written as 8-bit PNG under ``<out>/images/<class>/``;
the manifest records the window used per file. PNG and JPEG files are listed where they
are (absolute paths), not copied. ``preprocessing.json`` records the settings, and
``predict_dicom.py`` applies the same ones at inference.

A DICOM file that cannot be converted (truncated, not DICOM, no pixel data, an
undecodable compression) is skipped with its reason: printed, listed in
``<out>/skipped.csv``, and the exit status is 1 although ``manifest.csv`` holds every
other image.

Kermany's official test folder goes to ``official_test.csv`` (not into ``manifest.csv``),
for a final ``tlkit evaluate RUN --data data/chest_xray/official_test.csv --out ...``.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

from dicom_io import dicom_to_png, is_dicom  # beside this script (its folder is on sys.path)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
FIELDS = ["path", "label", "group", "source", "window_center", "window_width", "window_source", "photometric"]


def _row(path: str, label: str, group: str | None, source: str, window=None, photometric: str = "") -> dict:
    return {
        "path": path, "label": label, "group": group or "", "source": source,
        "window_center": f"{window.center:g}" if window else "", "window_width": f"{window.width:g}" if window else "",
        "window_source": window.source if window else "", "photometric": photometric,
    }


def convert_dicom(file: Path, label: str, out: Path, args: argparse.Namespace, name: str | None = None) -> dict:
    """One DICOM file -> ``out/images/<label>/<name>.png`` and its manifest row (patient = PatientID).

    Raises:
        ValueError: the file cannot be read or decoded (see ``dicom_io.read_dicom``).
    """
    target = out / "images" / label / f"{name or file.stem}.png"
    image, window = dicom_to_png(file, target, args.window_center, args.window_width, args.max_side)
    return _row(target.relative_to(out).as_posix(), label, image.patient_id, str(file), window, image.photometric)


def try_convert(file: Path, label: str, out: Path, args: argparse.Namespace, name: str | None,
                skipped: list[dict]) -> dict | None:
    """:func:`convert_dicom`, or ``None`` with ``{path, label, reason}`` appended to ``skipped``
    (one corrupt file is reported and the others are converted)."""
    try:
        return convert_dicom(file, label, out, args, name)
    except (ValueError, OSError) as exc:
        print(f"skipped {file}: {exc}", file=sys.stderr)
        skipped.append({"path": str(file), "label": label, "reason": str(exc)})
        return None


def from_folder(root: Path, out: Path, args: argparse.Namespace, skipped: list[dict]) -> list[dict]:
    """``root/<class>/**/*``: DICOM converted, PNG/JPEG listed; groups from PatientID or ``--group-regex``."""
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise SystemExit(f"{str(root)!r} has no class sub-folders; expected <root>/<class>/<files>")
    pattern = re.compile(args.group_regex) if args.group_regex else None
    rows = []
    for folder in classes:
        label = folder.name.lower()
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                match = pattern.search(file.name) if pattern else None
                rows.append(_row(str(file.resolve()), label, match.group(1) if match else None, str(file)))
            elif is_dicom(file):
                relative = file.relative_to(folder).with_suffix("")
                row = try_convert(file, label, out, args, "__".join(relative.parts), skipped)
                rows.extend([row] if row else [])
    return rows


_KERMANY_PATIENT = (
    re.compile(r"^(person\d+)_"),              # PNEUMONIA: person1_bacteria_1.jpeg
    re.compile(r"^((?:NORMAL2-)?IM-\d+)-\d+"),  # NORMAL: IM-0115-0001.jpeg, NORMAL2-IM-1427-0001.jpeg
)


def kermany_patient(name: str) -> str | None:
    """The patient id read from a Kermany file name (our reading of the naming scheme)."""
    for pattern in _KERMANY_PATIENT:
        match = pattern.match(name)
        if match:
            return match.group(1)
    return None


def from_kermany(root: Path) -> tuple[list[dict], list[dict]]:
    """(train+val rows, official test rows) of Kermany's chest_xray folders."""
    if not (root / "train").is_dir():
        raise SystemExit(f"{str(root)!r} has no train/ folder; expected <root>/{{train,val,test}}/{{NORMAL,PNEUMONIA}}")
    pools: dict[str, list[dict]] = {"train": [], "test": []}
    for split in ("train", "val", "test"):
        for label_dir in ("NORMAL", "PNEUMONIA"):
            folder = root / split / label_dir
            if not folder.is_dir():
                continue
            for file in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
                row = _row(str(file.resolve()), label_dir.lower(), kermany_patient(file.name), f"kermany/{split}")
                pools["test" if split == "test" else "train"].append(row)
    shared = {r["group"] for r in pools["train"] if r["group"]} & {r["group"] for r in pools["test"] if r["group"]}
    if shared:
        print(f"note: {len(shared)} patient id(s) appear in both Kermany's train/val and test folders "
              f"(e.g. {sorted(shared)[:3]}); official_test.csv is then not patient-independent of training")
    return pools["train"], pools["test"]


def from_rsna(root: Path, out: Path, args: argparse.Namespace, skipped: list[dict]) -> list[dict]:
    """RSNA Pneumonia Detection: Target 1 (any box) -> ``opacity``, else ``no_opacity``."""
    labels_csv = root / "stage_2_train_labels.csv"
    images = root / "stage_2_train_images"
    if not labels_csv.is_file() or not images.is_dir():
        raise SystemExit(f"{str(root)!r} needs stage_2_train_labels.csv and stage_2_train_images/")
    target: dict[str, int] = defaultdict(int)
    with open(labels_csv, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            target[row["patientId"]] = max(target[row["patientId"]], int(row["Target"]))
    rows = []
    for count, (patient, positive) in enumerate(sorted(target.items())):
        if args.limit and count >= args.limit:
            break
        file = images / f"{patient}.dcm"
        if not file.is_file():
            print(f"note: {file} listed in the labels but missing; skipped")
            continue
        row = try_convert(file, "opacity" if positive else "no_opacity", out, args, patient, skipped)
        rows.extend([row] if row else [])
    return rows


def write_csv(path: Path, rows: list[dict], fields: list[str] = FIELDS) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--kermany", type=Path, metavar="ROOT", help="chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}")
    source.add_argument("--rsna", type=Path, metavar="ROOT", help="RSNA Pneumonia Detection Challenge folder")
    source.add_argument("--from-folder", type=Path, metavar="ROOT", help="<root>/<class>/** DICOM, PNG or JPEG")
    source.add_argument("--sample", action="store_true", help="synthetic DICOM files (offline smoke path)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (new or empty)")
    parser.add_argument("--window-center", type=float, help="fixed window center for every DICOM (modality units)")
    parser.add_argument("--window-width", type=float, help="fixed window width for every DICOM")
    parser.add_argument("--max-side", type=int, help="shrink converted DICOM images to at most this many pixels")
    parser.add_argument("--group-regex", help="--from-folder images: a regex whose first group is the patient id")
    parser.add_argument("--limit", type=int, help="--rsna: convert only the first N patients")
    parser.add_argument("--patients", type=int, default=90, help="--sample: synthetic patients")
    parser.add_argument("--seed", type=int, default=0, help="--sample: random seed")
    args = parser.parse_args(argv)
    if (args.window_center is None) != (args.window_width is None):
        parser.error("give both --window-center and --window-width, or neither (header window)")

    out: Path = args.out
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--out {str(out)!r} exists and is not empty; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    official_test: list[dict] = []
    skipped: list[dict] = []
    if args.sample:
        from synthetic_dicom import write_sample

        write_sample(out / "dicom", patients=args.patients, seed=args.seed)
        rows = from_folder(out / "dicom", out, args, skipped)
    elif args.kermany:
        rows, official_test = from_kermany(args.kermany.expanduser())
    elif args.rsna:
        rows = from_rsna(args.rsna.expanduser(), out, args, skipped)
    else:
        rows = from_folder(args.from_folder.expanduser(), out, args, skipped)
    if skipped:
        write_csv(out / "skipped.csv", skipped, ["path", "label", "reason"])
    if not rows:
        raise SystemExit(f"none of the {len(skipped)} DICOM file(s) could be converted (see {out / 'skipped.csv'})"
                         if skipped else "no images found; check the source folder")
    write_csv(out / "manifest.csv", rows)
    if official_test:
        write_csv(out / "official_test.csv", official_test)
    settings = {
        "window": ("given" if args.window_center is not None else "header, else 0.5-99.5 percentile"),
        "window_center": args.window_center, "window_width": args.window_width, "max_side": args.max_side,
        "monochrome1": "inverted", "output": "8-bit PNG, one grey channel (tlkit repeats it to RGB when reading)",
    }
    (out / "preprocessing.json").write_text(json.dumps(settings, indent=1), encoding="utf-8")
    counts = Counter(r["label"] for r in rows)
    patients = len({r["group"] for r in rows if r["group"]})
    dicoms = sum(1 for r in rows if r["window_source"] or r["photometric"])
    windows = Counter(r["window_source"] for r in rows if r["window_source"])
    print(f"wrote {out / 'manifest.csv'}: {len(rows)} images ({dicoms} from DICOM; windows: {dict(windows)}), "
          f"{patients} patients, classes {dict(sorted(counts.items()))}"
          + (f"; official_test.csv: {len(official_test)} images" if official_test else ""))
    if skipped:
        print(f"{len(skipped)} DICOM file(s) could not be converted and are not in the manifest; they are listed "
              f"with the reason in {out / 'skipped.csv'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
