"""Audio datasets: class folders or CSV manifests -> decoded, checked clips -> speaker-aware splits -> ``tf.data``.

Every file is decoded once up front (soundfile; librosa's audioread fallback for what
libsndfile cannot read), mixed down to mono and resampled to the encoder's rate with
soxr. The decoded waveforms are kept in memory as float32 numpy arrays
(:attr:`AudioSplits.waveforms`), so epochs never touch the files again and a corrupt,
silent or too short file is reported by path and skipped before training starts.

Datasets (:mod:`tlkit.data.audio_pipeline`, re-exported here) yield ``(waveform float32
(B, clip_samples), targets float32 (B, num_classes))``: training takes one random, seeded crop
per clip and epoch (epoch-addressed, so a resumed run reads an uninterrupted run's crops);
evaluation takes ``crops`` evenly spaced crops per clip, and :func:`predict_clips` averages the
model's probabilities over them.

Splits reuse :mod:`tlkit.data.images`: a manifest's ``speaker`` column becomes
:attr:`Example.group`, and :func:`~tlkit.data.images.stratified_split` keeps every group
whole, so no speaker is in two splits.

Multi-task manifests (several label columns, ``tasks=``) are read by
:func:`tlkit.data.task_manifest.list_task_manifest`, the reader image runs use: each example
carries every task's labels (empty where missing), and the targets of a dataset are then
``{task: (B, C_task)}`` with ``-1`` rows where a label is missing (``targets=``).

Memory: a clip costs ``4 * sample_rate * seconds`` bytes (64 kB per second at 16 kHz),
so 10 hours of 16 kHz audio hold about 2.3 GB.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tlkit.backbones.spec import AudioFrontend, BackboneSpec
from tlkit.data.audio_pipeline import AudioEpochs, clip_samples, fixed_crops, make_audio_dataset
from tlkit.data.images import (
    Example,
    Splits,
    single_example_notes,
    stratified_split,
)
from tlkit.data.listing import (
    Listing,
    TaskColumn,
    keep_readable_classes,
    list_folder,
    list_manifest,
    require_two_classes,
)
from tlkit.data.task_manifest import (
    list_task_manifest,
    require_task_classes,
    with_classes,
)
from tlkit.errors import ConfigError, DataError

log = logging.getLogger("tlkit.data")

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif", ".au")

#: Random training crops per clip whose features are cached when an audio run's head is solved
#: (the encoder runs this many times over the training clips, once over validation).
AUDIO_CACHED_CROPS = 4

__all__ = [
    "AUDIO_CACHED_CROPS",
    "AUDIO_SUFFIXES",
    "AudioEpochs",
    "AudioSplits",
    "audio_clip_length",
    "audio_crops",
    "check_audio",
    "clip_samples",
    "fixed_crops",
    "is_audio_file",
    "load_audio",
    "load_audio_splits",
    "make_audio_dataset",
    "predict_clips",
]


@dataclass
class AudioSplits(Splits):
    """:class:`~tlkit.data.images.Splits` plus the decoded audio.

    Attributes:
        sample_rate: the rate every waveform was resampled to.
        waveforms: ``{path: float32 (samples,)}`` mono in -1..1 at ``sample_rate``, one
            entry per kept example (skipped files have none).
    """

    sample_rate: int = 16000
    waveforms: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    skipped_words = "unreadable, silent or too short"

    def seconds(self, examples: Sequence[Example]) -> float:
        """Total duration of ``examples`` in seconds."""
        return sum(len(self.waveforms[e.path]) for e in examples) / float(self.sample_rate)

    def _summary_parts(self) -> list[str]:
        parts = super()._summary_parts()
        parts.append(f"{self.seconds(self.train) / 60.0:.1f} min of training audio at {self.sample_rate} Hz")
        speakers = {e.group for e in self.train + self.val + self.test if e.group is not None}
        if speakers:
            parts.append(f"{len(speakers)} speakers, none shared between splits")
        return parts


def is_audio_file(path: str | Path) -> bool:
    """True when ``path`` ends in one of :data:`AUDIO_SUFFIXES` (case-insensitive)."""
    return Path(path).suffix.lower() in AUDIO_SUFFIXES


def load_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """Decodes one file to a mono float32 waveform ``(samples,)`` in -1..1 at ``sample_rate``.

    Channels are averaged; a file at another rate is resampled (soxr, high quality), so
    its duration and pitch are preserved. WAV, FLAC, OGG/Vorbis and MP3 are read by
    libsndfile; anything else falls back to librosa (audioread, needs ffmpeg).

    Raises:
        DataError: the file is missing or cannot be decoded; the message names it.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"audio file {str(file)!r} does not exist")
    try:
        waveform, rate = _decode(file)
    except DataError:
        raise
    except Exception as exc:  # soundfile, audioread and soxr raise many kinds
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"cannot decode audio file {str(file)!r}: {first}") from exc
    if waveform.size == 0:
        raise DataError(f"audio file {str(file)!r} holds no samples")
    if rate != sample_rate:
        import librosa

        waveform = librosa.resample(waveform, orig_sr=rate, target_sr=sample_rate, res_type="soxr_hq")
    return np.ascontiguousarray(waveform, dtype=np.float32)


def _decode(file: Path) -> tuple[np.ndarray, int]:
    """(mono float32 samples, native rate)."""
    import soundfile as sf

    try:
        data, rate = sf.read(str(file), dtype="float32", always_2d=True)
        return data.mean(axis=1), int(rate)
    except sf.LibsndfileError as exc:
        sndfile_error = exc
    if file.suffix.lower() in (".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif", ".au"):
        # libsndfile reads all of these; a failure means the file itself is broken.
        raise DataError(f"cannot decode audio file {str(file)!r}: {sndfile_error}")
    import librosa

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # librosa warns that audioread is deprecated
        data, rate = librosa.load(str(file), sr=None, mono=True, dtype=np.float32)
    return data, int(rate)


def check_audio(
    examples: Sequence[Example],
    sample_rate: int,
    *,
    min_seconds: float = 0.1,
    max_seconds: float | None = None,
    silence_threshold: float = 1e-4,
) -> tuple[list[Example], dict[str, np.ndarray], list[tuple[str, str]]]:
    """Decodes every file once; returns ``(kept, waveforms, [(path, reason), ...])``.

    A file is skipped (and logged with its path) when it cannot be decoded, when it is
    shorter than ``min_seconds`` or longer than ``max_seconds``, or when it is silent
    (peak absolute amplitude below ``silence_threshold``, -80 dBFS by default).
    ``waveforms`` maps each kept path to its float32 ``(samples,)`` at ``sample_rate``;
    a path listed twice is decoded once.
    """
    kept: list[Example] = []
    waveforms: dict[str, np.ndarray] = {}
    bad: list[tuple[str, str]] = []
    problems: dict[str, str] = {}
    for example in examples:
        if example.path not in waveforms and example.path not in problems:
            try:
                waveform = load_audio(example.path, sample_rate)
            except DataError as exc:
                problems[example.path] = str(exc).replace(f" {example.path!r}", "")
            else:
                seconds = len(waveform) / float(sample_rate)
                peak = float(np.max(np.abs(waveform))) if waveform.size else 0.0
                if not np.isfinite(waveform).all():
                    problems[example.path] = "holds NaN or infinite samples"
                elif seconds < min_seconds:
                    problems[example.path] = f"too short: {seconds:.3f}s < min_seconds={min_seconds}"
                elif max_seconds is not None and seconds > max_seconds:
                    problems[example.path] = f"too long: {seconds:.1f}s > max_seconds={max_seconds}"
                elif peak < silence_threshold:
                    problems[example.path] = f"silent: peak amplitude {peak:.2e} < {silence_threshold:g}"
                else:
                    waveforms[example.path] = waveform
        if example.path in problems:
            bad.append((example.path, problems[example.path]))
            log.warning("skipping %s: %s", example.path, problems[example.path])
        else:
            kept.append(example)
    if bad:
        log.warning("skipped %d unreadable, silent or wrong-length audio file(s) of %d", len(bad), len(examples))
    return kept, waveforms, bad


def _scan_speaker_folders(root: str | Path) -> Listing:
    """``root/<class>/<speaker>/**/<file>``: the first sub-folder below a class is the speaker."""
    base = Path(root).expanduser()
    listing = list_folder(base, AUDIO_SUFFIXES, "audio")
    grouped = []
    for example in listing.examples:
        relative = Path(example.path).relative_to(base)
        if len(relative.parts) < 3:
            raise DataError(
                f"{example.path!r} is not inside a speaker folder; with speaker_folders=True the layout is "
                f"{base}/<class>/<speaker>/<file>"
            )
        grouped.append(Example(example.path, example.labels, relative.parts[1]))
    return Listing(grouped, listing.ignored, listing.notes)


def load_audio_splits(
    path: str | Path | None = None,
    manifest: str | Path | None = None,
    *,
    sample_rate: int,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    min_seconds: float = 0.1,
    max_seconds: float | None = None,
    silence_threshold: float = 1e-4,
    speaker_folders: bool = False,
    drop_unreadable_classes: bool = False,
    tasks: Sequence[TaskColumn] = (),
) -> AudioSplits:
    """Reads a class folder or a manifest, decodes and checks every file, and splits by class.

    Args:
        path: ``path/<class>/**/<audio file>``; the class folder name is the label.
        manifest: a CSV with ``path,label`` and optionally ``speaker`` (or ``group``) columns.
        sample_rate: the encoder's rate; every file is resampled to it.
        val_fraction / test_fraction / seed: as :func:`tlkit.data.images.stratified_split`.
        min_seconds / max_seconds / silence_threshold: see :func:`check_audio`.
        speaker_folders: folders only: read ``path/<class>/<speaker>/<file>`` and keep
            each speaker in one split.
        drop_unreadable_classes: a class whose every file is skipped is left out (named in
            :attr:`AudioSplits.dropped_classes`) instead of being an error.
        tasks: a multi-task manifest's tasks (:func:`tlkit.multitask.manifest.task_columns`):
            its rows are read with every task's labels and split stratified on each row's
            first labelled task, speakers kept whole; ``drop_unreadable_classes`` does not apply.

    Returns:
        :class:`AudioSplits` whose ``waveforms`` hold every kept clip. When speakers are
        given, no speaker appears in two splits. With ``tasks``: ``tasks`` holds them with
        their classes, and ``class_names`` is empty.

    Raises:
        DataError: bad paths or manifest rows (see :mod:`tlkit.data.listing` and
            :mod:`tlkit.multitask.manifest`), fewer than two classes (per task), no usable
            file, or a class lost every file (without ``drop_unreadable_classes``).
        ConfigError: ``tasks`` with a data folder (class folders carry one label).
    """
    if (path is None) == (manifest is None):
        raise DataError("give exactly one of a data folder (`data.path`) or a CSV manifest (`data.manifest`)")
    if sample_rate <= 0:
        raise DataError(f"sample_rate must be a positive number of Hz, got {sample_rate}")
    if tasks:
        if manifest is None:
            raise ConfigError("[tasks] needs `[data] manifest`; class folders carry a single label")
        return _load_task_splits(manifest, tasks, sample_rate, val_fraction, test_fraction, seed,
                                 min_seconds=min_seconds, max_seconds=max_seconds, silence_threshold=silence_threshold)
    if path is not None:
        listing = _scan_speaker_folders(path) if speaker_folders else list_folder(path, AUDIO_SUFFIXES, "audio")
    else:
        listing = list_manifest(manifest)  # type: ignore[arg-type]
    source = str(path or manifest)
    examples, waveforms, skipped = check_audio(
        listing.examples, sample_rate, min_seconds=min_seconds, max_seconds=max_seconds,
        silence_threshold=silence_threshold,
    )
    if not examples:
        raise DataError(
            f"none of the audio files under {source} could be used ({len(skipped)} skipped; first: {skipped[:3]})"
        )
    dropped = keep_readable_classes(listing.examples, examples, skipped, source, drop_unreadable_classes)
    require_two_classes(examples, source)
    class_names = sorted({label for e in examples for label in e.labels})
    train, val, test = stratified_split(examples, val_fraction, test_fraction, seed)
    for name, split, fraction in (("validation", val, val_fraction), ("test", test, test_fraction)):
        missing = sorted(set(class_names) - {label for e in split for label in e.labels})
        if fraction > 0 and missing:
            log.warning(
                "the %s split has no example of %s (too few speakers or clips per class for whole-speaker splits)",
                name, missing,
            )
    return AudioSplits(class_names, train, val, test, skipped, listing.ignored, dropped,
                       [*listing.notes, *single_example_notes(examples)], sample_rate=sample_rate,
                       waveforms=waveforms)


def _load_task_splits(
    manifest: str | Path, tasks: Sequence[TaskColumn], sample_rate: int, val_fraction: float, test_fraction: float,
    seed: int, **checks: Any,
) -> AudioSplits:
    """:func:`load_audio_splits` of a multi-task manifest (see its ``tasks``)."""
    listing = list_task_manifest(manifest, tasks)
    examples, waveforms, skipped = check_audio(listing.examples, sample_rate, **checks)
    if not examples:
        raise DataError(
            f"none of the audio files in {manifest} could be used ({len(skipped)} skipped; first: {skipped[:3]})"
        )
    require_task_classes(examples, tasks, f"manifest {str(manifest)!r} (usable files)")
    train, val, test = stratified_split(examples, val_fraction, test_fraction, seed)
    found = with_classes(examples, tasks)
    for task in found:
        for name, split, fraction in (("validation", val, val_fraction), ("test", test, test_fraction)):
            missing = sorted(set(task.classes) - {label for e in split for label in e.task_labels(task.name)})
            if fraction > 0 and missing:
                log.warning("task %r: the %s split has no example of %s (too few speakers or clips per class for "
                            "whole-speaker splits)", task.name, name, missing)
    return AudioSplits([], train, val, test, skipped, listing.ignored, [], list(listing.notes), found,
                       sample_rate=sample_rate, waveforms=waveforms)


def audio_crops(spec: BackboneSpec, clip_seconds: float, eval_crops: int) -> tuple[int, int, int]:
    """``(sample_rate, clip_length, eval_crops)`` of an audio run on ``spec``: the encoder's rate,
    the samples per crop (:func:`audio_clip_length`) and the evaluation crops per clip.

    Raises:
        ConfigError: the backbone has no :class:`~tlkit.backbones.spec.AudioFrontend`,
            ``eval_crops`` < 1, or the crop is too short for the encoder.
    """
    frontend = spec.preprocessing
    if not isinstance(frontend, AudioFrontend):
        raise ConfigError(f"audio backbone {spec.name!r} has no AudioFrontend preprocessing: {frontend!r}")
    if int(eval_crops) < 1:
        raise ConfigError(f"[data] eval_crops must be >= 1, got {eval_crops}")
    return int(spec.sample_rate or frontend.sample_rate), audio_clip_length(spec, clip_seconds), int(eval_crops)


def audio_clip_length(spec: BackboneSpec, clip_seconds: float) -> int:
    """Samples per training / evaluation crop for a backbone spec: ``clip_seconds`` at its rate, or
    the exact length an encoder traced for one input size needs (``fixed_input_samples``, e.g.
    ``wav2vec2_base``).

    Raises:
        ConfigError: the crop is shorter than the encoder's ``min_input_samples``.
    """
    rate = int(spec.sample_rate or getattr(spec.preprocessing, "sample_rate", 16000))
    if clip_seconds <= 0:
        raise ConfigError(f"[data] clip_seconds must be > 0, got {clip_seconds}")
    fixed = spec.audio_encoder.fixed_input_samples
    clip = int(fixed) if fixed else clip_samples(clip_seconds, rate)
    minimum = spec.audio_encoder.min_input_samples
    if minimum and clip < int(minimum):
        raise ConfigError(
            f"[data] clip_seconds={clip_seconds} gives {clip} samples, but backbone {spec.name!r} needs at least "
            f"{minimum} ({int(minimum) / rate:g}s at {rate} Hz); raise clip_seconds"
        )
    return clip


def window_count(samples: int, length: int, crops: int) -> int:
    """Windows that score a clip of ``samples``: ``crops``, or ``ceil(samples / length)`` when more
    (the window contract, see :mod:`tlkit.audio_windows`)."""
    return max(int(crops), -(-int(samples) // max(1, int(length))))


def predict_clips(
    predict: Callable[[np.ndarray], Any],
    waveforms: Sequence[np.ndarray],
    clip_length: int,
    crops: int = 3,
    batch_size: int = 32,
) -> np.ndarray:
    """Probabilities per clip, averaged over evenly spaced crops: ``(N, C)`` float32.

    Each clip gets ``max(crops, ceil(samples / clip_length))`` crops (:func:`window_count`), so
    a clip longer than ``crops * clip_length`` is heard whole, as ``tlkit predict`` and every
    export score it.

    Args:
        predict: maps a float32 batch ``(b, clip_length)`` to probabilities ``(b, C)``
            (a Keras model, a serving function, ...).
        waveforms: N clips, each ``(samples,)`` float32 at the model's rate.
    """
    if not waveforms:
        raise DataError("predict_clips needs at least one clip")
    counts = [window_count(len(w), clip_length, crops) for w in waveforms]
    rows = np.concatenate([fixed_crops(w, clip_length, n) for w, n in zip(waveforms, counts)])
    outputs = [np.asarray(predict(rows[i : i + batch_size])) for i in range(0, len(rows), batch_size)]
    probabilities = np.concatenate(outputs).astype(np.float32)
    ends = np.cumsum(counts)
    return np.stack([probabilities[end - n : end].mean(axis=0) for end, n in zip(ends, counts)]).astype(np.float32)

