"""Synthetic chest "radiographs" as real DICOM files, for the offline smoke path.

No package ships chest X-rays, so ``prepare.py --sample`` writes small DICOM files with
pydicom and then reads them back through the same code as real ones. Each image is a
64x64 12-bit frontal "chest": a body silhouette, two darker lung fields, a bright
mediastinum and spine, rib arcs, detector noise. The ``pneumonia`` class adds one bright,
blurry opacity inside a lung field; ``normal`` has none. Classes are imbalanced (2:1 in
patients, 3:1 in images, close to Kermany's chest_xray set), and half of the pneumonia
patients have two images, so the split has patient groups to keep together.

The headers vary on purpose, to exercise every step of ``dicom_io``:

* most files are MONOCHROME2 with RescaleSlope 1 / RescaleIntercept 0 and a window in
  the header;
* every 5th is MONOCHROME1 (stored inverted);
* every 4th stores ``(value + 1024) / 2`` with RescaleSlope 2 / RescaleIntercept -1024;
* every 7th has no window in its header (the percentile fallback applies).

They are a pipeline test: a model that separates them has learnt "bright blob in a dark
field", nothing about pneumonia.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CLASSES = ("normal", "pneumonia")


def radiograph(positive: bool, size: int = 64, seed: int = 0) -> np.ndarray:
    """(size, size) float64 "attenuation" values in 0..4095 (MONOCHROME2: bright = dense)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    cx = 0.5 + rng.normal(0, 0.02)
    image = np.full((size, size), 250.0)  # air around the body: dark
    body = ((xx - cx) / 0.46) ** 2 + ((yy - 0.55) / 0.55) ** 2 < 1
    image[body] = 1700 + rng.normal(0, 60)
    lungs = []
    for side in (-1, 1):
        lx, ly = cx + side * rng.uniform(0.17, 0.2), 0.48 + rng.normal(0, 0.02)
        lung = ((xx - lx) / rng.uniform(0.12, 0.15)) ** 2 + ((yy - ly) / rng.uniform(0.27, 0.31)) ** 2 < 1
        image[lung] = 800 + rng.normal(0, 50)
        lungs.append((lx, ly, lung))
    spine = np.abs(xx - cx) < 0.06
    image[spine & body] = 2600
    heart = ((xx - cx - 0.06) / 0.13) ** 2 + ((yy - 0.62) / 0.12) ** 2 < 1
    image[heart] = np.maximum(image[heart], 2200)
    for k in range(6):  # rib arcs across the lung fields
        rib = np.abs(yy - (0.25 + 0.085 * k) - 0.08 * ((xx - cx) / 0.35) ** 2) < 0.012
        image[rib & body] += 450
    if positive:  # one consolidation: a bright, soft-edged blob inside a lung field
        lx, ly, lung = lungs[rng.integers(0, 2)]
        bx, by = lx + rng.normal(0, 0.03), ly + rng.uniform(-0.1, 0.18)
        radius = rng.uniform(0.07, 0.11)
        blob = np.exp(-(((xx - bx) ** 2 + (yy - by) ** 2) / (2 * radius**2)))
        image += blob * rng.uniform(900, 1400) * (lung | (blob > 0.5))
    image += rng.normal(0, 45, image.shape)  # detector noise
    # Mild blur so edges are not single-pixel steps (3x3 box, twice).
    for _ in range(2):
        padded = np.pad(image, 1, mode="edge")
        image = sum(padded[i:i + size, j:j + size] for i in range(3) for j in range(3)) / 9.0
    return np.clip(image, 0, 4095)


def write_dicom(path: str | Path, values: np.ndarray, *, patient_id: str, label: str, index: int,
                monochrome1: bool = False, rescaled: bool = False, window: tuple[float, float] | None = None
                ) -> Path:
    """Writes ``values`` (0..4095, bright = dense) as a 12-bit-in-16 CR DICOM file.

    ``window`` is (center, width) in the same bright-is-dense units; for MONOCHROME1 files
    it is converted to the stored (inverted) units, as a real header would hold it.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    # Modality units: MONOCHROME1 stores the inverted image, and its window is given in those units.
    modality = 4095 - values if monochrome1 else values.copy()
    if window is not None and monochrome1:
        window = (4095 - window[0], window[1])
    stored = (modality + 1024) / 2 if rescaled else modality  # undone by slope 2, intercept -1024
    stored = np.clip(np.round(stored), 0, 4095).astype(np.uint16)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[patient_id, str(index), "sop"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[patient_id, str(index), "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[patient_id, str(index), "series"])
    ds.PatientID = patient_id
    ds.PatientName = "SYNTHETIC^PHANTOM"
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.StudyDescription = f"tlkit synthetic test image ({label}); not a patient"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleSlope = "2" if rescaled else "1"
    ds.RescaleIntercept = "-1024" if rescaled else "0"
    if window is not None:
        ds.WindowCenter = f"{window[0]:.1f}"
        ds.WindowWidth = f"{window[1]:.1f}"
    ds.PixelData = stored.tobytes()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


def write_sample(out: str | Path, patients: int = 90, seed: int = 0, size: int = 64) -> list[tuple[Path, str]]:
    """Writes DICOM files for ``patients`` synthetic patients under ``out/<class>/``.

    Two thirds are ``pneumonia``; half of those have a second image. Returns
    ``[(path, label), ...]``.
    """
    rng = np.random.default_rng(seed)
    written = []
    index = 0
    for p in range(patients):
        label = "pneumonia" if p % 3 != 0 else "normal"
        patient_id = f"SYN{p:04d}"
        for visit in range(2 if p % 3 == 1 else 1):
            values = radiograph(label == "pneumonia", size, seed=int(rng.integers(1 << 31)))
            window = None if index % 7 == 6 else (float(rng.uniform(1600, 2000)), float(rng.uniform(2800, 3600)))
            file = Path(out) / label / f"{patient_id}_{visit + 1}.dcm"
            write_dicom(file, values, patient_id=patient_id, label=label, index=index,
                        monochrome1=index % 5 == 4, rescaled=index % 4 == 3, window=window)
            written.append((file, label))
            index += 1
    return written
