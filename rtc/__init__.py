"""WebRTC media of one call: peer set-up, microphone in, turn detection, camera snapshots, Opus out.

Used by the media actor (``actors/media.py``); nothing here touches the bus.
"""
