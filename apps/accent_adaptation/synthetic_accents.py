"""A small synthetic "accented speech" corpus made with espeak-ng, for the offline smoke path.

No package ships a multi-speaker accent corpus, so ``prepare.py --sample`` synthesises one
with espeak-ng's English accent voices. Each synthetic *speaker* is one accent voice with
its own voice variant (espeak's ``+m1``..``+m8``, ``+f1``..``+f5`` timbres), speaking rate
and pitch; every speaker reads the same sentences, so the words say nothing about the
accent.

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

import shutil
import subprocess
from pathlib import Path

import numpy as np

# label -> espeak-ng voice
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


def espeak_binary() -> str:
    """The espeak-ng (or espeak) executable, or a SystemExit naming how to install it."""
    for name in ("espeak-ng", "espeak"):
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit(
        "the synthetic accent corpus needs espeak-ng: `sudo apt-get install espeak-ng` (Debian/Ubuntu), "
        "`brew install espeak-ng` (macOS); or prepare a real corpus with --l2arctic / --common-voice"
    )


def synthesise(text: str, voice: str, out: Path, speed: int, pitch: int, binary: str | None = None) -> Path:
    """One sentence as a WAV file (espeak-ng's 22,050 Hz, 16-bit mono)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [binary or espeak_binary(), "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(out), text]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not out.is_file() or out.stat().st_size < 1000:
        raise RuntimeError(f"espeak-ng failed for voice {voice!r}: {result.stderr.strip() or 'no audio written'}")
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
    binary = espeak_binary()
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
                synthesise(SENTENCES[index], voice, file, speed, pitch, binary)
                rows.append({"path": file.relative_to(root).as_posix(), "label": accent, "speaker": speaker,
                             "voice": f"{voice} -s {speed} -p {pitch}", "text": SENTENCES[index]})
    return rows
