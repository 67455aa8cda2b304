#!/usr/bin/env bash
# Regenerate the example speech clips in this folder (needs espeak-ng, sox and
# python with soundfile). Each clip is a plain English sentence that Whisper
# tiny.en transcribes reliably; TEXTS.tsv lists filename<TAB>text.
#
#   clip1.wav   en-us male,   150 wpm, 16 kHz mono 16-bit WAV
#   clip2.wav   en-gb male,   130 wpm, 16 kHz mono 16-bit WAV
#   clip3.flac  en-us female, 160 wpm, 44.1 kHz stereo FLAC (exercises resampling + downmix)
#   clip4.mp3   en-us +m3,    140 wpm, 16 kHz mono MP3 (written by libsndfile via soundfile)
set -euo pipefail
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

text1="Good morning, everyone. Let us start the meeting."
text2="I will send you the report tomorrow morning."
text3="The weather is very nice today, so we are going to the park."
text4="I would like a cup of coffee and a piece of cake, please."

espeak-ng -v en-us -s 150 -w "$tmp/1.wav" "$text1"
espeak-ng -v en-gb -s 130 -w "$tmp/2.wav" "$text2"
espeak-ng -v en-us+f3 -s 160 -w "$tmp/3.wav" "$text3"
espeak-ng -v en-us+m3 -s 140 -w "$tmp/4.wav" "$text4"

sox "$tmp/1.wav" -r 16000 -c 1 -b 16 clip1.wav
sox "$tmp/2.wav" -r 16000 -c 1 -b 16 clip2.wav
sox "$tmp/3.wav" -r 44100 -c 2 -b 16 clip3.flac
sox "$tmp/4.wav" -r 16000 -c 1 -b 16 "$tmp/4_16k.wav"
# sox here has no MP3 writer; libsndfile (>= 1.1) has one.
python -c "import sys, soundfile as sf; a, sr = sf.read(sys.argv[1]); sf.write(sys.argv[2], a, sr, format='MP3')" \
    "$tmp/4_16k.wav" clip4.mp3

printf 'clip1.wav\t%s\nclip2.wav\t%s\nclip3.flac\t%s\nclip4.mp3\t%s\n' \
    "$text1" "$text2" "$text3" "$text4" > TEXTS.tsv
