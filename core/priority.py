"""CPU priority of a process: the media clock must win the CPU over model inference.

On a small machine the speech models (ASR, LLM, TTS) keep every core busy during a turn, while
the media actor must wake every 20 ms to release a packet. The supervisor starts model actors at
a lower priority (a higher nice value, allowed to anyone; ``--nice``), the LLM lowest since it
goes on generating while the first sentence is synthesised, and the media actor asks for a
higher one (allowed to root or with CAP_SYS_NICE; otherwise it says so and carries on).
"""

from __future__ import annotations

import os


def set_niceness(nice: int) -> int | None:
    """Set this process's nice value; the value in force, or ``None`` when not permitted."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except PermissionError:
        return None
    return os.getpriority(os.PRIO_PROCESS, 0)
