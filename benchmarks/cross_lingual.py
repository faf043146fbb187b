"""Cross-lingual transfer on offline speech: Whisper tiny.en (English only) against Whisper base
(multilingual), each beside the no-transfer baseline, on the same splits.

No human speech ships offline here, so the corpus is eSpeak NG (the ``espeakng-loader`` wheel,
``pip install -e ".[apps]"``) reading short sentences. It is *synthetic* speech: read every number
as "what these encoders make of eSpeak's rule sets", not as a claim about human speakers.

Experiments (clips resampled to 16 kHz, one centred ``--clip-seconds`` crop per clip):

- ``accent`` (held-out speakers): English sentences read by the eSpeak voices of eight languages
  (``en-us``, ``de``, ``fr``, ``es``, ``it``, ``pt``, ``nl``, ``pl``): eSpeak reads English text
  with that language's phoneme rules, i.e. an L1 accent. Class = the L1. Each synthetic speaker
  (a voice variant ``+m1``..``+f4`` with its own rate and pitch) lies in one split only.
- ``voice`` (held-out languages): who is speaking, across languages. Class = the voice variant
  (6 of eSpeak's timbres); each clip is a native sentence in its voice's language. Training and
  validation speak ``en-us``, ``de``, ``fr``, ``es``; the test set speaks only ``it``, ``pt``,
  ``nl``, ``pl``, languages the classifier never heard.
- ``language`` (held-out voices): which of the eight languages a native sentence is in; the voice
  variants ``f4`` and ``m5`` speak only in the test set, ``f2`` only in validation.

Rows per experiment: logistic regression on log-mel statistics (no pretrained network,
:func:`tlkit.baselines.log_mel_statistics`), and the linear probe (logistic regression, ``C``
chosen on validation, :func:`tlkit.baselines.linear_probe`) on the mean-pooled frozen features
of each encoder. Accuracy with 95% Wilson intervals on the test split.

With ``--train``, the ``accent`` corpus also goes through ``tlkit train`` once per encoder (the
product's default audio recipe: head solved on cached features, then the top groups fine-tuned);
``tlkit train`` splits by speaker itself and measures its own baseline and probe on that split,
and those rows are printed as it measured them.

Run: ``.venv/bin/python benchmarks/cross_lingual.py`` (about 6 minutes on 2 shared cores, most of it
Whisper base), ``--quick`` (fewer speakers), ``--train`` (adds two ``tlkit train`` runs),
``--markdown FILE``, ``--json FILE``. Needs the ``speech-multilingual`` extra for Whisper base; without it
the base rows say how to install it.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import _common

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "apps" / "accent_adaptation"))

L1_VOICES = {"english": "en-us", "german": "de", "french": "fr", "spanish": "es", "italian": "it",
             "portuguese": "pt", "dutch": "nl", "polish": "pl"}
VARIANTS = ("m1", "m3", "m5", "f1", "f2", "f4")
TRAIN_LANGUAGES = ("en-us", "de", "fr", "es")
HELD_OUT_LANGUAGES = ("it", "pt", "nl", "pl")
ENCODERS = ("whisper_tiny_en_encoder", "whisper_base_encoder")
RATE = 16000

# Short native sentences (written for this benchmark), six per language.
NATIVE = {
    "en-us": ("The children walked to the river after lunch.", "Please close the window before it rains.",
              "My sister bought fresh bread this morning.", "We will meet at the station at nine.",
              "The old dog sleeps under the kitchen table.", "Nobody remembered the name of the song."),
    "de": ("Die Kinder gingen nach dem Essen zum Fluss.", "Bitte schließ das Fenster, bevor es regnet.",
           "Meine Schwester hat heute Morgen frisches Brot gekauft.", "Wir treffen uns um neun am Bahnhof.",
           "Der alte Hund schläft unter dem Küchentisch.", "Niemand wusste noch den Namen des Liedes."),
    "fr": ("Les enfants sont allés à la rivière après le déjeuner.", "Ferme la fenêtre avant qu'il pleuve.",
           "Ma sœur a acheté du pain frais ce matin.", "Nous nous retrouvons à la gare à neuf heures.",
           "Le vieux chien dort sous la table de la cuisine.", "Personne ne se souvenait du nom de la chanson."),
    "es": ("Los niños caminaron al río después de comer.", "Por favor, cierra la ventana antes de que llueva.",
           "Mi hermana compró pan fresco esta mañana.", "Nos vemos en la estación a las nueve.",
           "El perro viejo duerme debajo de la mesa de la cocina.", "Nadie recordaba el nombre de la canción."),
    "it": ("I bambini sono andati al fiume dopo pranzo.", "Per favore chiudi la finestra prima che piova.",
           "Mia sorella ha comprato pane fresco stamattina.", "Ci vediamo alla stazione alle nove.",
           "Il vecchio cane dorme sotto il tavolo della cucina.", "Nessuno ricordava il nome della canzone."),
    "pt": ("As crianças foram ao rio depois do almoço.", "Por favor, fecha a janela antes que chova.",
           "A minha irmã comprou pão fresco esta manhã.", "Encontramo-nos na estação às nove.",
           "O cão velho dorme debaixo da mesa da cozinha.", "Ninguém se lembrava do nome da canção."),
    "nl": ("De kinderen liepen na de lunch naar de rivier.", "Doe alsjeblieft het raam dicht voordat het regent.",
           "Mijn zus kocht vanochtend vers brood.", "We zien elkaar om negen uur op het station.",
           "De oude hond slaapt onder de keukentafel.", "Niemand wist nog de naam van het liedje."),
    "pl": ("Dzieci poszły nad rzekę po obiedzie.", "Proszę zamknij okno, zanim zacznie padać.",
           "Moja siostra kupiła rano świeży chleb.", "Spotkamy się na dworcu o dziewiątej.",
           "Stary pies śpi pod kuchennym stołem.", "Nikt nie pamiętał tytułu tej piosenki."),
}


def _speak(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    import librosa
    from synthetic_accents import engine

    speech = engine().speak(text, voice, speed, pitch).astype(np.float32) / 32768.0
    return librosa.resample(speech, orig_sr=engine().sample_rate, target_sr=RATE).astype(np.float32)


def accent_corpus(speakers: int, clips: int, seed: int) -> list[dict[str, Any]]:
    """English sentences in eight L1 voices; ``speakers`` synthetic speakers per L1."""
    from synthetic_accents import SENTENCES

    rng = np.random.default_rng(seed)
    rows = []
    for label, voice in L1_VOICES.items():
        variants = rng.permutation(VARIANTS + ("m2", "f3"))
        for s in range(speakers):
            speed, pitch = int(rng.integers(140, 186)), int(rng.integers(30, 71))
            for index in rng.permutation(len(SENTENCES))[:clips]:
                rows.append({"label": label, "speaker": f"{label}_{s:02d}", "language": "en",
                             "wave": _speak(SENTENCES[index], f"{voice}+{variants[s % len(variants)]}", speed, pitch)})
    return rows


def voice_corpus(speakers: int, clips: int, seed: int) -> list[dict[str, Any]]:
    """Native sentences in eight languages by six voice variants; ``speakers`` per (language, variant)."""
    rng = np.random.default_rng(seed)
    rows = []
    for language in (*TRAIN_LANGUAGES, *HELD_OUT_LANGUAGES):
        for variant in VARIANTS:
            for s in range(speakers):
                speed, pitch = int(rng.integers(140, 186)), int(rng.integers(30, 71))
                for index in rng.permutation(len(NATIVE[language]))[:clips]:
                    rows.append({"label": variant, "speaker": f"{language}_{variant}_{s}", "language": language,
                                 "wave": _speak(NATIVE[language][index], f"{language}+{variant}", speed, pitch)})
    return rows


def split_accent(rows: list[dict[str, Any]], seed: int) -> dict[str, list[dict[str, Any]]]:
    """Per L1: a quarter of its speakers to test, one to validation, the rest train (speakers whole)."""
    rng = np.random.default_rng(seed + 1)
    out: dict[str, list[dict[str, Any]]] = {"train": [], "val": [], "test": []}
    for label in L1_VOICES:
        speakers = sorted({r["speaker"] for r in rows if r["label"] == label})
        order = list(rng.permutation(speakers))
        test_n = max(1, len(order) // 4)
        roles = {sp: "test" if i < test_n else "val" if i == test_n else "train" for i, sp in enumerate(order)}
        for row in rows:
            if row["label"] == label:
                out[roles[row["speaker"]]].append(row)
    return out


def split_voice(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Test: the held-out languages. Validation: speaker 0 of each (training language, variant)."""
    out: dict[str, list[dict[str, Any]]] = {"train": [], "val": [], "test": []}
    for row in rows:
        if row["language"] in HELD_OUT_LANGUAGES:
            out["test"].append(row)
        else:
            out["val" if row["speaker"].endswith("_0") else "train"].append(row)
    return out


def split_language(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Language identification: class = the language; voices ``f4``/``m5`` only in test, ``f2`` in validation."""
    out: dict[str, list[dict[str, Any]]] = {"train": [], "val": [], "test": []}
    for row in rows:
        variant = row["label"]
        role = "test" if variant in ("f4", "m5") else "val" if variant == "f2" else "train"
        out[role].append({**row, "label": row["language"]})
    return out


def score(splits: dict[str, list[dict[str, Any]]], clip: int, encoders: tuple[str, ...]) -> list[dict[str, Any]]:
    """The baseline row and one probe row per encoder, all on ``splits``."""
    from tlkit.backbones.loading import available_offline
    from tlkit.backbones.registry import get as get_spec
    from tlkit.baselines import frozen_clip_features, linear_probe, log_mel_statistics, wilson_interval

    classes = sorted({r["label"] for r in splits["train"]})
    y = {k: np.array([classes.index(r["label"]) for r in v]) for k, v in splits.items()}
    results = []

    def add(name: str, kind: str, feats: dict[str, np.ndarray], seconds: float) -> None:
        fit = linear_probe(feats["train"], y["train"], feats["val"], y["val"], feats["test"], y["test"],
                           name=name, kind="baseline" if kind == "baseline" else "probe")
        low, high = wilson_interval(float(fit.test_accuracy), len(y["test"]))
        results.append({"model": name, "kind": kind, "val": fit.val_accuracy, "test": fit.test_accuracy,
                        "test_low": low, "test_high": high, "seconds": seconds + fit.seconds, "C": fit.params["C"]})

    start = time.monotonic()
    add("log-mel statistics + logistic regression", "baseline",
        {k: np.stack([log_mel_statistics(r["wave"], RATE) for r in v]) for k, v in splits.items()},
        time.monotonic() - start)
    for name in encoders:
        if name not in _registered() or not available_offline(get_spec(name)):
            results.append({"model": f"{name} probe", "kind": "probe", "missing":
                            "not installed: pip install -e \".[speech-multilingual]\"" if "base" in name else
                            "weights not available offline"})
            continue
        start = time.monotonic()
        feats = {k: frozen_clip_features(name, [r["wave"] for r in v], clip, crops=1) for k, v in splits.items()}
        add(f"{name} probe", "probe", feats, time.monotonic() - start)
    return results


def _registered() -> set[str]:
    from tlkit.backbones.registry import list_backbones

    return {spec.name for spec in list_backbones()}


def train_runs(rows: list[dict[str, Any]], encoders: tuple[str, ...], clip_seconds: float,
               workdir: Path) -> list[dict[str, Any]]:
    """``tlkit train`` on the accent corpus once per encoder; the rows it measured on its own split."""
    import soundfile as sf

    import tlkit
    from tlkit.config import config_from_dict

    manifest = workdir / "accent.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "speaker"])
        for i, row in enumerate(rows):
            path = workdir / "clips" / f"{i:04d}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(str(path), row["wave"], RATE, subtype="PCM_16")
            writer.writerow([path.relative_to(workdir).as_posix(), row["label"], row["speaker"]])
    out = []
    for name in encoders:
        if name not in _registered():
            continue
        config = {
            "name": f"xl_{name}", "output_dir": str(workdir / f"run_{name}"), "seed": 0,
            "data": {"manifest": str(manifest), "val_fraction": 0.2, "test_fraction": 0.25, "batch_size": 16,
                     "clip_seconds": clip_seconds, "eval_crops": 1},
            "backbone": {"name": name},
            "head": {"pooling": "avg", "dropout": 0.1},
            "augmentation": {"enabled": False},
        }
        start = time.monotonic()
        result = tlkit.train(config_from_dict(config, base_dir=workdir), verbose=0)
        status = tlkit.RunDir(result.run_dir).status()
        transfer = status.get("transfer") or {}
        for row in transfer.get("rows", []):
            out.append({"encoder": name, **{k: row.get(k) for k in ("model", "kind", "val_accuracy", "test_accuracy")}})
        out.append({"encoder": name, "model": "tlkit train total", "kind": "time",
                    "seconds": round(time.monotonic() - start, 1), "warnings": transfer.get("warnings", [])})
    return out


def table(results: list[dict[str, Any]]) -> str:
    from tlkit.text import format_table

    rows = []
    for r in results:
        if "missing" in r:
            rows.append([r["model"], r["kind"], "-", r["missing"], "-"])
            continue
        rows.append([r["model"], r["kind"], f"{r['val']:.3f}",
                     f"{r['test']:.3f} [{r['test_low']:.2f}, {r['test_high']:.2f}]", f"{r['seconds']:.1f}s"])
    return format_table(["model", "kind", "val accuracy", "test accuracy [95% CI]", "time"], rows)


def train_table(runs: list[dict[str, Any]]) -> str:
    from tlkit.text import format_table

    def pct(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}"

    rows = [[r["encoder"], r["model"], r["kind"], pct(r.get("val_accuracy")), pct(r.get("test_accuracy"))]
            for r in runs if r["kind"] != "time"]
    rows += [[r["encoder"], "(wall time of tlkit train)", "", "", f"{r['seconds']:.0f}s"] for r in runs if r["kind"] == "time"]
    return format_table(["encoder", "model", "kind", "val accuracy", "test accuracy"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer speakers per class")
    parser.add_argument("--train", action="store_true", help="also run `tlkit train` on the accent corpus")
    parser.add_argument("--clip-seconds", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    info = _common.machine()
    _common.print_machine(info)
    clip = int(args.clip_seconds * RATE)
    accent_speakers, voice_speakers = (4, 2) if args.quick else (8, 3)
    start = time.monotonic()
    accent = accent_corpus(accent_speakers, 4, args.seed)
    voices = voice_corpus(voice_speakers, 2, args.seed)
    print(f"synthesised {len(accent)} accent clips and {len(voices)} voice clips in {time.monotonic() - start:.0f}s")
    report: dict[str, Any] = {"machine": info, "clip_seconds": args.clip_seconds}
    sections = []
    for name, splits in (("accent (held-out speakers)", split_accent(accent, args.seed)),
                         ("voice (held-out languages)", split_voice(voices)),
                         ("language identification (held-out voices)", split_language(voices))):
        counts = {k: len(v) for k, v in splits.items()}
        results = score(splits, clip, ENCODERS)
        report[name] = {"counts": counts, "rows": results}
        text = f"{name}: train {counts['train']}, val {counts['val']}, test {counts['test']} clips\n{table(results)}"
        print("\n" + text)
        sections.append(text)
    if args.train:
        with tempfile.TemporaryDirectory(prefix="tlkit-xl-") as workdir:
            runs = train_runs(accent, ENCODERS, args.clip_seconds, Path(workdir))
        report["tlkit_train"] = runs
        text = "tlkit train on the accent corpus (its own speaker split, the same for both encoders):\n" + train_table(runs)
        print("\n" + text)
        sections.append(text)
    if args.markdown:
        args.markdown.write_text("\n\n".join(f"```\n{s}\n```" for s in sections) + "\n")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
