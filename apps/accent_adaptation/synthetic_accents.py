"""A small synthetic "accented speech" corpus made with eSpeak NG, for the offline smoke path.

No package ships a multi-speaker accent corpus, so ``prepare.py --sample`` synthesises one
with eSpeak NG's English accent voices. Each synthetic *speaker* is one accent voice with
its own voice variant (eSpeak's ``+m1``..``+m8``, ``+f1``..``+f5`` timbres), speaking rate
and pitch; every speaker reads the same sentences, so the words say nothing about the
accent.

Where eSpeak NG comes from: the ``espeakng-loader`` wheel (a tlkit dependency, installed
by ``pip install -e .``), which bundles the eSpeak NG library (``libespeak-ng`` 1.52,
GPL-3.0) and its voice data for Linux, macOS and Windows. It is called through ctypes;
no ``espeak-ng`` program or system package is needed. A corpus is reproducible: the same
arguments write the same samples (eSpeak's pitch flutter carries over from one utterance
to the next within a process, so one clip depends on the clips synthesised before it).

What it is: a way to run the whole pipeline (synthesis -> manifest with a speaker column ->
speaker-independent split -> Whisper encoder fine-tuning -> adaptation to a new accent ->
export) anywhere, in a minute or two, on data with a real, audible accent difference
(espeak's accent voices differ in their phoneme rules and vowel qualities).

What it is not: accented human speech. Every espeak accent is one rule set, so all
"speakers" of an accent share one pronunciation and differ only in timbre, rate and pitch.
A model that separates them has learnt espeak's rule sets; its accuracy says nothing about
recognising human accents, and the adaptation result says nothing about real accent
transfer. Use L2-ARCTIC or Common Voice for that (``prepare.py --l2arctic/--common-voice``).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np

# label -> eSpeak NG voice
ACCENT_VOICES = {
    "american": "en-us",
    "caribbean": "en-029",
    "scottish": "en-gb-scotland",
    "west_midlands": "en-gb-x-gbcwmd",
    "received_pronunciation": "en-gb-x-rp",
    "lancastrian": "en-gb-x-gbclan",
    "new_york": "en-us-nyc",
}
DEFAULT_ACCENTS = ("american", "caribbean", "scottish", "west_midlands")
DEFAULT_NEW_ACCENT = "received_pronunciation"
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5")

# Short sentences written for this app, full of vowels and consonants that accents treat
# differently (bath/trap, r after vowels, t between vowels, "ou", "th", "ng").
SENTENCES = (
    "The girl bought a bath towel and some water for the car.",
    "Our house is just around the corner, past the old church.",
    "I thought the weather would be better by Thursday afternoon.",
    "Put the butter and the tomatoes on the table, right there.",
    "Nobody knew the answer, so we laughed and started over.",
    "Three thin boys were singing a song about the northern road.",
    "Could you ask the driver to stop near the park gate?",
    "My brother says the party starts after eight tonight.",
    "The water in the harbour was dark and very cold.",
    "We heard a bird calling from the tall tree by the river.",
    "Half of the class walked home through the grass.",
    "She bought a new pair of shoes for her daughter.",
)


# espeak_ng.h / speak_lib.h constants
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_RATE, _PITCH = 1, 3
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class Espeak:
    """eSpeak NG as a library, in synchronous mode: text -> int16 samples at :attr:`sample_rate`.

    One per process (:func:`engine`): the library keeps global state.
    """

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as exc:
            raise SystemExit(
                "the synthetic accent corpus needs the espeakng-loader package (eSpeak NG as a library): "
                "`pip install -e \".[apps]\"` installs it (GPL-3.0, so it is an extra); or prepare a real corpus "
                "with --l2arctic / --common-voice"
            ) from exc
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        self.sample_rate = int(lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0))
        if self.sample_rate <= 0:
            raise RuntimeError(f"eSpeak NG failed to initialise from {espeakng_loader.get_data_path()!r}")
        self._lib = lib
        self._chunks: list[np.ndarray] = []
        self._callback = _SYNTH_CALLBACK(self._collect)  # kept alive as long as the engine
        lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav: ctypes.Array, count: int, _events: int) -> int:
        if wav and count > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        return 0  # 0: go on synthesising

    def speak(self, text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
        """``text`` read by ``voice`` (e.g. ``"en-gb-scotland+m3"``) at ``speed`` words per minute
        and ``pitch`` (0-99): int16 ``(samples,)`` at :attr:`sample_rate`."""
        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"eSpeak NG has no voice {voice!r}")
        self._lib.espeak_SetParameter(_RATE, int(speed), 0)
        self._lib.espeak_SetParameter(_PITCH, int(pitch), 0)
        self._chunks = []
        data = text.encode("utf-8")
        status = self._lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        self._lib.espeak_Synchronize()
        if status != 0 or not self._chunks:
            raise RuntimeError(f"eSpeak NG failed for voice {voice!r} (status {status})")
        return np.concatenate(self._chunks)


@functools.cache
def engine() -> Espeak:
    """The process's eSpeak NG engine (initialised on first use)."""
    return Espeak()


def synthesise(text: str, voice: str, out: Path, speed: int, pitch: int) -> Path:
    """One sentence as a WAV file (eSpeak NG's 22,050 Hz, 16-bit mono)."""
    import soundfile as sf

    speech = engine().speak(text, voice, speed, pitch)
    if len(speech) < 1000:
        raise RuntimeError(f"eSpeak NG wrote only {len(speech)} samples for voice {voice!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(out), speech, engine().sample_rate, subtype="PCM_16")
    return out


def write_corpus(
    out: str | Path,
    accents: tuple[str, ...] = (*DEFAULT_ACCENTS, DEFAULT_NEW_ACCENT),
    speakers_per_accent: int = 5,
    clips_per_speaker: int = 6,
    seed: int = 0,
) -> list[dict[str, str]]:
    """Writes ``out/clips/<accent>/<speaker>/<n>.wav``; returns manifest rows
    ``{"path" (relative to out), "label", "speaker", "voice", "text"}``.

    Speakers of different accents draw their timbre, rate and pitch from the same ranges,
    and each speaker reads ``clips_per_speaker`` sentences drawn from the same pool.
    """
    unknown = sorted(set(accents) - set(ACCENT_VOICES))
    if unknown:
        raise SystemExit(f"unknown synthetic accent(s) {unknown}; choose from {sorted(ACCENT_VOICES)}")
    rng = np.random.default_rng(seed)
    root = Path(out)
    rows = []
    for accent in accents:
        variants = rng.permutation(VARIANTS)
        for s in range(speakers_per_accent):
            speaker = f"{accent}_{s + 1:02d}"
            variant = variants[s % len(variants)]
            voice = f"{ACCENT_VOICES[accent]}+{variant}"
            speed, pitch = int(rng.integers(140, 186)), int(rng.integers(30, 71))
            for n, index in enumerate(rng.permutation(len(SENTENCES))[:clips_per_speaker]):
                file = root / "clips" / accent / speaker / f"{n + 1:02d}.wav"
                synthesise(SENTENCES[index], voice, file, speed, pitch)
                rows.append({"path": file.relative_to(root).as_posix(), "label": accent, "speaker": speaker,
                             "voice": f"{voice} -s {speed} -p {pitch}", "text": SENTENCES[index]})
    return rows
