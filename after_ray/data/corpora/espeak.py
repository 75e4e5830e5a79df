"""A minimal ctypes binding to the libespeak-ng shipped by the ``espeakng-loader`` package.

It renders text to a float32 waveform at espeak's native rate (22050 Hz) with a chosen voice
("en-us+f3": language, then a variant after "+") and prosody (rate, pitch, pitch range, volume,
word gap). Nothing is installed system-wide: the library and its data directory come from the
package.

Two properties of libespeak-ng shape this module:

- ``espeak_Initialize`` is called exactly once per process (the team measured that a second call
  crashes the library), behind a lock and a module-level flag.
- espeak keeps global synthesis state, so every call holds one module-level lock from "set voice"
  to "last sample". Part of that state carries over from one utterance to the next (the pitch
  "flutter" position and the wave phase), so the *same* call can give slightly different samples
  depending on what the process synthesized before. A fresh process that replays the same
  sequence of calls gives identical samples; ``synth.py`` relies on that by rendering each speaker
  in its own new process.
"""

from __future__ import annotations

import ctypes
import functools
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from after_ray.errors import ConfigError, CorpusError

NATIVE_SAMPLE_RATE = 22050

# Constants from espeak-ng's speak_lib.h.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000  # report errors instead of calling exit() inside the library
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_EE_OK = 0
_PARAM_RATE = 1
_PARAM_VOLUME = 2
_PARAM_PITCH = 3
_PARAM_RANGE = 4
_PARAM_WORDGAP = 7
_CALLBACK_BUFFER_MS = 1000  # larger buffers mean fewer Python callbacks per utterance

# Prosody limits espeak accepts (rates above 450 wpm switch espeak to a different speed-up path).
RATE_RANGE = (80, 450)
PITCH_RANGE = (0, 100)
PITCH_SPAN_RANGE = (0, 100)
VOLUME_RANGE = (0, 200)
WORD_GAP_MAX = 100

_VOICE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_\-/]+(\+[A-Za-z0-9_\-]+)?$")

_SynthCallbackType = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


@dataclass(frozen=True)
class Prosody:
    """espeak prosody settings for one utterance.

    rate_wpm: speaking rate in words per minute (80-450); pitch: base pitch (0-100, 50 = voice
    default); pitch_range: intonation range (0 = monotone, 100 = wide); volume: amplitude
    (0-200, 100 = normal; espeak clips its 16-bit output for loud voices above ~100);
    word_gap: extra pause between words in units of 10 ms at the normal rate.
    """

    rate_wpm: int = 175
    pitch: int = 50
    pitch_range: int = 50
    volume: int = 100
    word_gap: int = 0

    def validate(self) -> None:
        """Raise ConfigError naming every value outside espeak's accepted range."""
        problems = []
        checks = [
            ("rate_wpm", self.rate_wpm, RATE_RANGE),
            ("pitch", self.pitch, PITCH_RANGE),
            ("pitch_range", self.pitch_range, PITCH_SPAN_RANGE),
            ("volume", self.volume, VOLUME_RANGE),
            ("word_gap", self.word_gap, (0, WORD_GAP_MAX)),
        ]
        for name, value, (low, high) in checks:
            if not isinstance(value, int | np.integer) or not low <= value <= high:
                problems.append(f"{name}={value!r} (allowed: integers {low}..{high})")
        if problems:
            raise ConfigError("espeak prosody out of range: " + "; ".join(problems))


class _Engine:
    """The loaded library, initialised once; all access goes through ``_LOCK``."""

    def __init__(self) -> None:
        self.lib = _load_library()
        data_path = _data_path()
        rate = self.lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS,
            _CALLBACK_BUFFER_MS,
            str(data_path).encode(),
            _INITIALIZE_DONT_EXIT,
        )
        if rate <= 0:
            raise CorpusError(
                f"libespeak-ng failed to initialise with data directory {data_path} "
                f"(status {rate}); reinstall the espeakng-loader package"
            )
        self.sample_rate = int(rate)
        self.chunks: list[bytes] = []
        # Keep a reference to the callback object: espeak holds only the raw function pointer.
        self.callback = _SynthCallbackType(self._collect)
        self.lib.espeak_SetSynthCallback(self.callback)

    def _collect(self, wav, num_samples: int, events) -> int:
        # Called by espeak from inside espeak_Synth (synchronous mode), on this thread.
        if wav and num_samples > 0:
            self.chunks.append(ctypes.string_at(wav, num_samples * 2))
        return 0  # 0 = continue synthesis


_LOCK = threading.Lock()
_engine: _Engine | None = None


def _data_path() -> Path:
    try:
        import espeakng_loader
    except ImportError as err:
        raise CorpusError(
            "the synthesized demo corpus needs the espeakng-loader package "
            "(pip install espeakng-loader), which ships libespeak-ng and its data"
        ) from err
    return Path(espeakng_loader.get_data_path())


def _load_library() -> ctypes.CDLL:
    import espeakng_loader

    lib_path = espeakng_loader.get_library_path()
    try:
        lib = ctypes.CDLL(lib_path)
    except OSError as err:
        raise CorpusError(
            f"cannot load libespeak-ng from {lib_path}: {err}; reinstall espeakng-loader"
        ) from err
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_SetSynthCallback.argtypes = [_SynthCallbackType]
    lib.espeak_SetSynthCallback.restype = None
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetVoiceByName.restype = ctypes.c_int
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_SetParameter.restype = ctypes.c_int
    lib.espeak_Synth.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_uint,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.c_uint,
        ctypes.c_void_p,
        ctypes.c_void_p,
    ]
    lib.espeak_Synth.restype = ctypes.c_int
    lib.espeak_Synchronize.restype = ctypes.c_int
    lib.espeak_Info.argtypes = [ctypes.c_void_p]
    lib.espeak_Info.restype = ctypes.c_char_p
    if hasattr(lib, "espeak_ng_SetRandSeed"):
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_ng_SetRandSeed.restype = ctypes.c_int
    return lib


def _get_engine() -> _Engine:
    """The process's engine; the first caller initialises espeak. Call with ``_LOCK`` held."""
    global _engine
    if _engine is None:
        _engine = _Engine()
    return _engine


def is_initialized() -> bool:
    """Whether this process has already called ``espeak_Initialize``."""
    return _engine is not None


def library_version() -> str:
    """libespeak-ng's version string (e.g. "1.52.0"); loads the library without initialising it."""
    with _LOCK:
        lib = _engine.lib if _engine is not None else _load_library()
        return lib.espeak_Info(None).decode()


def sample_rate() -> int:
    """The rate espeak renders at (22050 Hz for the shipped data); initialises espeak if needed."""
    with _LOCK:
        return _get_engine().sample_rate


def list_variants() -> list[str]:
    """Names of the voice variants in the shipped data (usable after "+" in a voice name)."""
    return sorted(_known_variants())


@functools.cache
def _known_variants() -> frozenset[str]:
    variant_dir = _data_path() / "voices" / "!v"
    return frozenset(p.name for p in variant_dir.iterdir() if p.is_file())


def synthesize(
    text: str,
    voice: str = "en-us",
    prosody: Prosody | None = None,
    *,
    rand_seed: int = 0,
) -> np.ndarray:
    """Render ``text`` with espeak; returns float32 mono samples in [-1, 1] at 22050 Hz.

    ``voice`` is "<language>[+<variant>]", e.g. "en-us+f3" or "en-gb-scotland+m2".
    ``rand_seed`` seeds espeak's own noise generator (breathiness) for this utterance.
    Raises ConfigError for an unknown voice or out-of-range prosody.
    """
    prosody = prosody or Prosody()
    prosody.validate()
    if not _VOICE_NAME_PATTERN.match(voice):
        raise ConfigError(
            f"espeak voice {voice!r} is not of the form '<language>[+<variant>]' (e.g. 'en-us+f3')"
        )
    # espeak silently ignores an unknown variant, so check it here.
    if "+" in voice and voice.split("+", 1)[1] not in _known_variants():
        raise ConfigError(
            f"espeak voice {voice!r}: unknown variant; available: {', '.join(list_variants())}"
        )
    encoded = text.encode("utf-8") + b"\0"
    with _LOCK:
        engine = _get_engine()
        lib = engine.lib
        status = lib.espeak_SetVoiceByName(voice.encode())
        if status != _EE_OK:
            raise ConfigError(
                f"espeak has no voice {voice!r} (status {status}); languages are the names "
                "espeak lists (en-us, en, en-gb-scotland, ...), variants are in list_variants()"
            )
        settings = [
            (_PARAM_RATE, prosody.rate_wpm),
            (_PARAM_VOLUME, prosody.volume),
            (_PARAM_PITCH, prosody.pitch),
            (_PARAM_RANGE, prosody.pitch_range),
            (_PARAM_WORDGAP, prosody.word_gap),
        ]
        for parameter, value in settings:
            if lib.espeak_SetParameter(parameter, int(value), 0) != _EE_OK:
                raise CorpusError(f"espeak rejected parameter {parameter}={value}")
        if hasattr(lib, "espeak_ng_SetRandSeed"):
            lib.espeak_ng_SetRandSeed(int(rand_seed) & 0x7FFFFFFF)
        engine.chunks = []
        status = lib.espeak_Synth(
            encoded, len(encoded), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None
        )
        lib.espeak_Synchronize()
        chunks, engine.chunks = engine.chunks, []
    if status != _EE_OK:
        raise CorpusError(f"espeak_Synth failed with status {status} for text {text[:40]!r}")
    samples = np.frombuffer(b"".join(chunks), dtype=np.int16)
    return samples.astype(np.float32) / 32768.0
