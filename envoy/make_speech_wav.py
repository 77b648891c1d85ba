#!/usr/bin/env python3
"""Writes envoy/speech.wav, the demo's audio sample: one second of a 440 Hz
tone, 8 kHz mono 16-bit PCM (about 16 KB). Standard library only; the
output is the same on every run.

    python3 envoy/make_speech_wav.py [OUT]
"""

import math
import struct
import sys
import wave
from pathlib import Path

RATE, SECONDS, TONE_HZ, AMPLITUDE = 8000, 1.0, 440.0, 0.3


def samples():
    count = int(RATE * SECONDS)
    for n in range(count):
        # Fade in and out over 50 ms so the tone starts and ends without a click.
        fade = min(1.0, n / (0.05 * RATE), (count - n) / (0.05 * RATE))
        yield int(32767 * AMPLITUDE * fade * math.sin(2 * math.pi * TONE_HZ * n / RATE))


def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("speech.wav")
    with wave.open(str(out), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(RATE)
        wav.writeframes(b"".join(struct.pack("<h", s) for s in samples()))
    print(f"{out}: {out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
