"""The training state of TAPT and fine-tuning (model, optimiser, schedule, step) on disk.

``torch.save`` through the one atomic writer (``store.atomic``), and a load that unpickles
nothing but tensors and plain containers. A checkpoint directory holds one such file; a resumed
run continues from it exactly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from after_ray.errors import RunStateError, exception_chain
from after_ray.store.atomic import atomic_write


def save_training_state(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a TAPT (or fine-tuning) state dict atomically with ``torch.save``.

    If anything fails the temporary file is removed and ``path`` keeps the previous state; an
    I/O failure (disk full, file size limit) becomes a ``RunStateError`` saying so, anything
    else propagates unchanged. torch's zip writer re-raises a failed ``write`` of the file
    object as a RuntimeError ("unexpected pos ...") whose context is the OSError, so the
    OSError is looked for along the exception's chain.
    """
    return atomic_write(
        path,
        lambda handle: torch.save(state, handle),
        what="the training state",
        disk_error=lambda exc: next(
            (e for e in exception_chain(exc) if isinstance(e, OSError)), None
        ),
    )


def load_training_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a state written by ``save_training_state`` (tensors and plain data only).

    Nothing but tensors and plain containers is ever unpickled (``weights_only=True``). A
    missing, truncated or foreign file is a ``RunStateError`` naming it.
    """
    path = Path(path)
    # A checkpoint directory without a usable state cannot be resumed from; without it,
    # resuming falls back to the checkpoint before it (or starts the stage again).
    advice = (
        f"delete the checkpoint directory {str(path.parent)!r} and run the same command again "
        "to resume from the checkpoint before it"
    )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RunStateError(f"the training state {str(path)!r} is missing; {advice}") from None
    except MemoryError:
        raise
    except Exception as exc:
        # torch.load reports a bad file with whatever its layers raise: RuntimeError (truncated
        # zip), UnpicklingError (a foreign or refused object), EOFError, ValueError, ...
        if any(cls.__name__ == "UnpicklingError" for cls in type(exc).__mro__):
            # Not quoted: torch's message suggests weights_only=False, i.e. running the pickle.
            reason = "it holds objects other than tensors and plain data, refused unexecuted"
        else:
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise RunStateError(
            f"the training state {str(path)!r} is corrupt, truncated or not written by "
            f"after-ray ({reason}); {advice}"
        ) from None
    if not isinstance(state, dict):
        raise RunStateError(
            f"the training state {str(path)!r} holds a {type(state).__name__}, not a state "
            f"dict; {advice}"
        )
    return state
