"""Transcription of speech between long stretches of silence, noise and music-like tones, with and
without ``--vad``: words placed in the gaps, word error rate, RTFx.

    python benchmarks/vad_silence.py [--model tiny.en] [--files 3] [--device auto] [--out FILE]

Builds ``--files`` espeak-ng files (needs espeak-ng), each 10 sentences separated by 5-30 s gaps of
digital silence, hiss (-30 dBFS) or chords (-20 dBFS) in turn (tests/support/transcribe_clips.py,
seeded), and transcribes them all in one job per setting, with word timestamps: the words whose
middle lies more than 0.5 s outside every sentence ("words in gaps": invented there, or real words
timed into the gap), the insertions of the word alignment against the text spoken, WER (jiwer,
Whisper's English normalizer) and RTFx (audio seconds / wall seconds of the job, the model loaded);
``--plain`` adds a run without word timestamps (the default mode) for WER and RTFx.
Run from the repository root.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.support (the clip builder)

GAP_KINDS = ("silence", "noise", "tones")
GAP_SECONDS = (5, 12, 30, 8, 20, 15, 25, 6, 18, 10)


def build_files(folder: Path, n_files: int):
    from tests.support.transcribe_clips import MORE_SENTENCES, SENTENCES, build_with_gaps, write

    pool = SENTENCES + MORE_SENTENCES
    files = []
    for i in range(n_files):
        sentences = [pool[(10 * i + k) % len(pool)] for k in range(10)]
        gaps = [(GAP_KINDS[(i + k) % 3], GAP_SECONDS[(i + k) % len(GAP_SECONDS)]) for k in range(10)]
        audio, truth = build_with_gaps(sentences, gaps)
        files.append((write(folder / f"gaps{i}.wav", audio), truth, len(audio) / 16000))
    return files


def run(engine, files, vad, word_timestamps):
    from encdec_cli.io.inputs import AudioItem
    from encdec_cli.tasks.transcribe import Transcriber
    from encdec_cli.tasks.vad import VadOptions
    from encdec_cli.tasks.whisper_rules import TranscribeOptions

    opts = TranscribeOptions(word_timestamps=word_timestamps, vad=VadOptions() if vad else None)
    out = {}
    items = [AudioItem(str(p), p.stem, str(p)) for p, _, _ in files]
    start = time.perf_counter()
    Transcriber(engine, opts).run(items, lambda item, t, e: out.__setitem__(item.name, (t, e)))
    wall = time.perf_counter() - start
    assert all(e is None for _, e in out.values()), out
    return {k: t for k, (t, _) in out.items()}, wall


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny.en")
    ap.add_argument("--files", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None, help="JSON results file")
    ap.add_argument("--plain", action="store_true", help="Also run without word timestamps (RTFx, WER)")
    args = ap.parse_args()

    import jiwer
    import torch
    from whisper_normalizer.english import EnglishTextNormalizer

    from encdec_cli.engine import Engine
    from tests.support.transcribe_clips import words_outside

    norm = EnglishTextNormalizer()
    engine = Engine(args.model, device=args.device)
    device = (
        torch.cuda.get_device_name()
        if engine.device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        files = build_files(Path(tmp), args.files)
        audio_s = sum(d for _, _, d in files)
        speech_s = sum(t.end - t.start for _, truth, _ in files for t in truth)
        results = {"model": args.model, "device": device, "files": args.files, "audio_seconds": audio_s,
                   "speech_seconds": speech_s}  # fmt: skip
        run(engine, files[:1], True, False)  # warm up (the VAD model, caches)
        for vad in (False, True):
            name = "vad" if vad else "no_vad"
            runs = [("timed", True)] + ([("plain", False)] if args.plain else [])
            refs = [norm(" ".join(t.text for t in truth)) for _, truth, _ in files]
            for label, word_timestamps in runs:
                texts, wall = run(engine, files, vad, word_timestamps)
                hyps = [norm(texts[p.stem].text) for p, _, _ in files]
                w = jiwer.process_words(refs, hyps)
                results[f"{name}_{label}_wer"] = w.wer
                results[f"{name}_{label}_insertions"] = w.insertions
                results[f"{name}_{label}_rtfx"] = audio_s / wall
                if word_timestamps:
                    in_gaps = sum(len(words_outside(texts[p.stem].segments, truth)) for p, truth, _ in files)
                    results[f"{name}_words_in_gaps"] = in_gaps
                print(
                    f"{name:6} {label:5} words in gaps {results[f'{name}_words_in_gaps']:3d}  insertions "
                    f"{w.insertions:3d}  WER {100 * w.wer:.2f}%  RTFx {audio_s / wall:.1f}",
                    flush=True,
                )
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
