"""Tracks: the kinds of experiment the harness runs (bench/tracks/base.py). Class-incremental
classification is built in; other tracks register through the `fedame_bench.tracks` entry
point or `register_track`."""

from bench.config import ConfigError
from bench.tracks.base import Stage, Track, available_tracks, register_track
from bench.tracks.class_incremental import ClassIncremental
from bench.tracks.personalized import Personalized
from bench.tracks.sequential_rec import SequentialRec

__all__ = ["ClassIncremental", "Personalized", "SequentialRec", "Stage", "Track", "available_tracks", "get_track", "register_track"]


def get_track(name: str) -> type[Track]:
    tracks = available_tracks()
    if name not in tracks:
        raise ConfigError(f"unknown track {name!r}; known tracks: {', '.join(tracks)}")
    return tracks[name]
