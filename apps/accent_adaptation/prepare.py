"""Turns an accented-speech corpus into tlkit manifests with a speaker column.

Sources::

    # L2-ARCTIC (24 non-native speakers, 6 first languages): <root>/<SPEAKER>/wav/*.wav
    python apps/accent_adaptation/prepare.py --l2arctic ~/l2arctic --out data/l2arctic --new-accent vietnamese

    # Common Voice (English): <root>/validated.tsv + <root>/clips/*.mp3, accent from the `accents` column
    python apps/accent_adaptation/prepare.py --common-voice ~/cv-corpus-en --out data/cv_accents \
        --accents "United States English=american,England English=england,Scottish English=scottish,India and South Asia (India, Pakistan, Sri Lanka)=south_asian" \
        --new-accent scottish --max-per-speaker 20

    # offline smoke path: a synthetic corpus made with eSpeak NG, which the espeakng-loader
    # wheel (a tlkit dependency) bundles as a library (see synthetic_accents.py)
    python apps/accent_adaptation/prepare.py --sample --out data/accent_sample

Writes into ``--out``:

- ``manifest.csv``: every clip, ``path,label,speaker`` (+ ``source``, ``text``);
- ``base.csv``: the clips of every accent except ``--new-accent`` (what ``tlkit train``
  reads; its split keeps each speaker whole);
- ``new_accent.csv``: the clips of ``--new-accent`` only, for ``adapt.py``.

Without ``--new-accent`` only ``manifest.csv`` is written (train on it directly).
Audio files are listed where they are (absolute paths), except the synthetic ones.
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
from collections import Counter, defaultdict
from pathlib import Path

# L2-ARCTIC v5 speakers and their first language (from the corpus README; pass
# --speaker-table to use your own speaker,label CSV instead).
L2ARCTIC_L1 = {
    "ABA": "arabic", "SKA": "arabic", "YBAA": "arabic", "ZHAA": "arabic",
    "BWC": "mandarin", "LXC": "mandarin", "NCC": "mandarin", "TXHC": "mandarin",
    "ASI": "hindi", "RRBI": "hindi", "SVBI": "hindi", "TNI": "hindi",
    "HJK": "korean", "HKK": "korean", "YDCK": "korean", "YKWK": "korean",
    "EBVS": "spanish", "ERMS": "spanish", "MBMPS": "spanish", "NJS": "spanish",
    "HQTV": "vietnamese", "PNV": "vietnamese", "THV": "vietnamese", "TLV": "vietnamese",
}
FIELDS = ["path", "label", "speaker", "source", "text"]


def _cap(rows: list[dict], max_per_speaker: int | None, seed: int) -> list[dict]:
    """At most ``max_per_speaker`` clips per speaker (a seeded random choice)."""
    if not max_per_speaker:
        return rows
    by_speaker: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_speaker[row["speaker"]].append(row)
    rng = random.Random(seed)
    kept = []
    for speaker in sorted(by_speaker):
        group = by_speaker[speaker]
        kept.extend(group if len(group) <= max_per_speaker else sorted(rng.sample(group, max_per_speaker),
                                                                       key=lambda r: r["path"]))
    return kept


def from_l2arctic(root: Path, table: dict[str, str]) -> list[dict]:
    rows = []
    speakers = sorted(p for p in root.iterdir() if p.is_dir() and (p / "wav").is_dir())
    if not speakers:
        raise SystemExit(f"{str(root)!r} has no <SPEAKER>/wav/ folders; expected the L2-ARCTIC layout")
    for folder in speakers:
        label = table.get(folder.name) or table.get(folder.name.upper())
        if label is None:
            print(f"note: speaker {folder.name} is not in the speaker table; skipped")
            continue
        for wav in sorted((folder / "wav").glob("*.wav")):
            transcript = folder / "transcript" / f"{wav.stem}.txt"
            text = transcript.read_text(encoding="utf-8").strip() if transcript.is_file() else ""
            rows.append({"path": str(wav.resolve()), "label": label, "speaker": folder.name,
                         "source": "l2arctic", "text": text})
    return rows


def parse_accents(spec: str) -> dict[str, str]:
    """``"Common Voice accent=label,..."`` -> ``{accent: label}`` (label defaults to a slug)."""
    mapping = {}
    # Accent names may hold commas inside parentheses: split only on commas outside them.
    depth, part, parts = 0, "", []
    for char in spec:
        depth += char == "("
        depth -= char == ")"
        if char == "," and depth == 0:
            parts.append(part)
            part = ""
        else:
            part += char
    parts.append(part)
    for item in filter(None, (p.strip() for p in parts)):
        name, _, label = item.partition("=")
        slug = "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")
        mapping[name.strip()] = (label.strip() or slug)
    return mapping


def from_common_voice(root: Path, accents: dict[str, str]) -> list[dict]:
    table = root / "validated.tsv"
    if not table.is_file():
        raise SystemExit(f"{str(root)!r} has no validated.tsv; expected a Common Voice language folder")
    csv.field_size_limit(1 << 24)
    rows, ambiguous = [], 0
    with open(table, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        column = "accents" if "accents" in (reader.fieldnames or ()) else "accent"
        if column not in (reader.fieldnames or ()):
            raise SystemExit(f"{table} has no accents/accent column (columns: {reader.fieldnames})")
        for row in reader:
            named = {a.strip() for a in (row.get(column) or "").split("|") if a.strip()}
            labels = {accents[a] for a in named if a in accents}
            if len(labels) > 1:
                ambiguous += 1
            if len(labels) != 1:
                continue
            clip = root / "clips" / row["path"]
            if clip.is_file():
                rows.append({"path": str(clip.resolve()), "label": labels.pop(), "speaker": row["client_id"],
                             "source": "common_voice", "text": row.get("sentence", "")})
    if ambiguous:
        print(f"note: skipped {ambiguous} clip(s) whose speaker gave more than one of the chosen accents")
    return rows


def from_sample(out: Path, args: argparse.Namespace) -> list[dict]:
    from synthetic_accents import DEFAULT_ACCENTS, write_corpus  # beside this script

    accents = tuple(a.strip() for a in args.sample_accents.split(",")) if args.sample_accents else DEFAULT_ACCENTS
    if args.new_accent and args.new_accent not in accents:
        accents = (*accents, args.new_accent)
    rows = write_corpus(out, accents, args.speakers_per_accent, args.clips_per_speaker, args.seed)
    for row in rows:
        row["source"] = f"eSpeak NG {row.pop('voice')}"
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--l2arctic", type=Path, metavar="ROOT", help="L2-ARCTIC: ROOT/<SPEAKER>/wav/*.wav")
    source.add_argument("--common-voice", type=Path, metavar="ROOT", help="Common Voice: ROOT/validated.tsv, ROOT/clips/")
    source.add_argument("--sample", action="store_true", help="synthetic eSpeak NG corpus (offline smoke path)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (new or empty)")
    parser.add_argument("--new-accent", help="the accent held out of base.csv for adapt.py")
    parser.add_argument("--speaker-table", type=Path, help="--l2arctic: a speaker,label CSV replacing the built-in table")
    parser.add_argument("--accents", help="--common-voice: 'accent name=label,...' to keep (required)")
    parser.add_argument("--max-per-speaker", type=int, help="cap on clips per speaker (seeded random choice)")
    parser.add_argument("--min-speakers", type=int, default=3,
                        help="drop accents with fewer speakers (a whole-speaker split needs >= 3)")
    parser.add_argument("--sample-accents", help="--sample: base accents (default american,caribbean,scottish,west_midlands)")
    parser.add_argument("--speakers-per-accent", type=int, default=5, help="--sample")
    parser.add_argument("--clips-per-speaker", type=int, default=6, help="--sample")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    out: Path = args.out
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--out {str(out)!r} exists and is not empty; choose a new folder")
    if args.sample and args.new_accent is None:
        args.new_accent = "received_pronunciation"
    out.mkdir(parents=True, exist_ok=True)
    if args.sample:
        rows = from_sample(out, args)
    elif args.l2arctic:
        table = L2ARCTIC_L1
        if args.speaker_table:
            with open(args.speaker_table, newline="", encoding="utf-8") as handle:
                table = {r["speaker"]: r["label"] for r in csv.DictReader(handle)}
        rows = from_l2arctic(args.l2arctic.expanduser(), table)
    else:
        if not args.accents:
            parser.error("--common-voice needs --accents 'accent name=label,...'")
        rows = from_common_voice(args.common_voice.expanduser(), parse_accents(args.accents))
    rows = _cap(rows, args.max_per_speaker, args.seed)
    speakers = defaultdict(set)
    for row in rows:
        speakers[row["label"]].add(row["speaker"])
    few = sorted(label for label, s in speakers.items() if len(s) < args.min_speakers)
    if few:
        print(f"note: dropping accent(s) {few}: fewer than {args.min_speakers} speakers each")
        rows = [r for r in rows if r["label"] not in few]
    if len({r["label"] for r in rows}) < 2:
        raise SystemExit("fewer than two accents left; check the source and --accents / --min-speakers")
    write_csv(out / "manifest.csv", rows)
    written = ["manifest.csv"]
    if args.new_accent:
        if args.new_accent not in speakers or args.new_accent in few:
            raise SystemExit(f"--new-accent {args.new_accent!r} has no usable clips; accents: {sorted(speakers)}")
        write_csv(out / "base.csv", [r for r in rows if r["label"] != args.new_accent])
        write_csv(out / "new_accent.csv", [r for r in rows if r["label"] == args.new_accent])
        written += ["base.csv", "new_accent.csv"]
    clips = Counter(r["label"] for r in rows)
    summary = ", ".join(f"{label} {clips[label]} clips/{len(speakers[label])} speakers" for label in sorted(clips))
    print(f"wrote {', '.join(written)} in {out}: {summary}"
          + (f"; new accent: {args.new_accent}" if args.new_accent else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
