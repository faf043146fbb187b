"""DICOM to display pixels: modality LUT, VOI windowing, MONOCHROME1 inversion, 8-bit output.

The one place this app turns a DICOM file into the picture the model sees. ``prepare.py``
calls it to write training images and ``predict_dicom.py`` calls it at inference, so both
apply the same steps with the same window:

1. decode the stored values (pydicom; JPEG-compressed files need the decoders pydicom
   names in its error, e.g. ``pip install pylibjpeg pylibjpeg-libjpeg``);
2. **modality LUT**: ``RescaleSlope * stored + RescaleIntercept`` (or the Modality LUT
   Sequence), giving the modality's own units;
3. **windowing** (VOI LUT, DICOM PS3.3 C.11.2.1.2): a window ``(center, width)`` chosen by
   :func:`choose_window` -- a fixed window given by the caller, else the header's
   ``WindowCenter``/``WindowWidth`` (first pair), else the 0.5-99.5 percentile range of
   the image -- mapped linearly (or by ``VOILUTFunction`` LINEAR_EXACT / SIGMOID) to 0..255;
4. **MONOCHROME1** images (bright = low value) are inverted, so 255 is always "dense";
5. the result is one 8-bit grey channel. Grey to 3 channels happens where the image is
   read: tlkit's decoder (``tf.io.decode_image(channels=3)``) repeats the channel, and
   :func:`to_rgb` does the same for inference.

Colour DICOMs (``SamplesPerPixel = 3``, e.g. dermoscopy) are converted to RGB and not
windowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PYDICOM_HINT = "reading DICOM needs pydicom: `.venv/bin/pip install pydicom`"


@dataclass(frozen=True)
class Window:
    """A VOI window in modality units (after the rescale), and where it came from."""

    center: float
    width: float
    source: str  # "given", "header" or "percentile"
    function: str = "LINEAR"  # DICOM VOILUTFunction: LINEAR, LINEAR_EXACT or SIGMOID


@dataclass
class DicomImage:
    """One decoded DICOM image.

    ``values``: (H, W) float64 in modality units for greyscale, (H, W, 3) uint8 RGB for colour.
    """

    values: np.ndarray
    photometric: str
    header_window: Window | None
    patient_id: str | None
    study_uid: str | None

    @property
    def is_colour(self) -> bool:
        return self.values.ndim == 3


def _pydicom() -> Any:
    try:
        import pydicom
    except ImportError as exc:
        raise SystemExit(PYDICOM_HINT) from exc
    return pydicom


def is_dicom(path: str | Path) -> bool:
    """True for ``.dcm``/``.dicom`` files, and for any file with the ``DICM`` preamble marker."""
    file = Path(path)
    if file.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with open(file, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _first(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value[0]) if hasattr(value, "__len__") and not isinstance(value, (str, bytes)) else float(value)
    except (TypeError, ValueError, IndexError):
        return None


def read_dicom(path: str | Path) -> DicomImage:
    """Decodes one single-frame DICOM file and applies its modality LUT.

    Raises:
        ValueError: the file is missing, truncated or not DICOM, holds no pixel data, is
            multi-frame, or has pixel data pydicom cannot decode (the message names the file
            and, for compressed pixels, which decoder to install). Callers report the file
            and go on with the others.
    """
    pydicom = _pydicom()
    from pydicom.pixels import apply_modality_lut, convert_color_space

    try:
        ds = pydicom.dcmread(str(path))
    except Exception as exc:  # InvalidDicomError, OSError, EOFError, struct errors from a truncated file
        detail = (str(exc).strip().splitlines() or [""])[0]
        raise ValueError(f"cannot read DICOM file {str(path)!r}: {type(exc).__name__}: {detail}") from exc
    if "PixelData" not in ds:
        raise ValueError(f"{str(path)!r} holds no pixel data")
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        raise ValueError(f"{str(path)!r} has {ds.NumberOfFrames} frames; this app reads single-frame radiographs")
    try:
        stored = ds.pixel_array
    except Exception as exc:  # pydicom raises RuntimeError/NotImplementedError naming the missing plugin
        raise ValueError(f"cannot decode the pixels of {str(path)!r}: {exc}") from exc
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    patient = str(ds.PatientID) if "PatientID" in ds and str(ds.PatientID) else None
    study = str(ds.StudyInstanceUID) if "StudyInstanceUID" in ds else None
    if int(getattr(ds, "SamplesPerPixel", 1)) == 3:
        rgb = stored
        if photometric.startswith("YBR"):
            rgb = convert_color_space(stored, photometric, "RGB")
        if rgb.dtype != np.uint8:  # e.g. 16-bit colour: scale to 8 bits
            rgb = (rgb.astype(np.float64) / max(float(rgb.max()), 1.0) * 255.0).round()
        return DicomImage(np.asarray(rgb, np.uint8), photometric, None, patient, study)
    values = np.asarray(apply_modality_lut(stored, ds), np.float64)
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    window = None
    if center is not None and width is not None and width >= 1:
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
        window = Window(center, width, "header", function)
    return DicomImage(values, photometric, window, patient, study)


def choose_window(image: DicomImage, center: float | None = None, width: float | None = None,
                  percentiles: tuple[float, float] = (0.5, 99.5)) -> Window:
    """The window to apply: the one given, else the header's, else a percentile range."""
    if center is not None and width is not None:
        if width < 1:
            raise ValueError(f"window width must be >= 1, got {width}")
        return Window(float(center), float(width), "given")
    if image.header_window is not None:
        return image.header_window
    low, high = np.percentile(image.values, percentiles)
    return Window((low + high) / 2, max(float(high - low), 1.0), "percentile")


def apply_window(values: np.ndarray, window: Window) -> np.ndarray:
    """Modality values -> 0..255 float per DICOM PS3.3 C.11.2.1.2 (LINEAR, LINEAR_EXACT, SIGMOID)."""
    x = np.asarray(values, np.float64)
    c, w = window.center, window.width
    if window.function == "SIGMOID":
        y = 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    elif window.function == "LINEAR_EXACT":
        y = np.clip((x - c) / w + 0.5, 0.0, 1.0)
    else:  # LINEAR: the standard's default, with its half-unit offsets
        if w < 1:
            raise ValueError(f"LINEAR windows need width >= 1, got {w}")
        y = (x - (c - 0.5)) / max(w - 1.0, 1e-9) + 0.5
        y = np.where(x <= c - 0.5 - (w - 1) / 2, 0.0, np.where(x > c - 0.5 + (w - 1) / 2, 1.0, y))
    return np.clip(y, 0.0, 1.0) * 255.0


def to_display(image: DicomImage, window: Window | None) -> np.ndarray:
    """(H, W) uint8 greyscale (bright = dense) or (H, W, 3) uint8 RGB for colour images."""
    if image.is_colour:
        return image.values
    if window is None:
        raise ValueError("greyscale DICOM images need a window")
    grey = apply_window(image.values, window)
    if image.photometric == "MONOCHROME1":
        grey = 255.0 - grey
    return np.round(grey).astype(np.uint8)


def to_rgb(pixels: np.ndarray) -> np.ndarray:
    """(H, W) grey or (H, W, 3) -> (H, W, 3) float32 0..255, the model's input (grey repeated)."""
    array = np.asarray(pixels, np.float32)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    return array


def dicom_to_png(path: str | Path, out: str | Path, center: float | None = None, width: float | None = None,
                 max_side: int | None = None) -> tuple[DicomImage, Window | None]:
    """Windows one DICOM file and writes it as an 8-bit PNG (grey, or RGB for colour files).

    ``max_side`` shrinks large images (aspect kept, antialiased) to save disk and decode time.
    Returns the decoded image and the window used (``None`` for colour images).
    """
    from PIL import Image

    image = read_dicom(path)
    window = None if image.is_colour else choose_window(image, center, width)
    picture = Image.fromarray(to_display(image, window))
    if max_side and max(picture.size) > max_side:
        scale = max_side / max(picture.size)
        picture = picture.resize((max(1, round(picture.size[0] * scale)), max(1, round(picture.size[1] * scale))),
                                 Image.Resampling.LANCZOS)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    picture.save(out)
    return image, window
