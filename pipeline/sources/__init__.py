"""Source adapters, by the name the CLI and `normalize` take."""

from __future__ import annotations

from pipeline.sources.base import Source, SourceOptions
from pipeline.sources.generic import Generic
from pipeline.sources.helpsteer import HelpSteer, HelpSteer2, HelpSteer2Preference, HelpSteer3
from pipeline.sources.ultrafeedback import UltraFeedback, UltraFeedbackBinarized

SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        HelpSteer(),
        HelpSteer2(),
        HelpSteer2Preference(),
        HelpSteer3(),
        UltraFeedback(),
        UltraFeedbackBinarized(),
        Generic(),
    )
}


def get_source(name: str) -> Source:
    """The adapter called `name`.

    Raises:
        ValueError: naming the unknown source and the known ones.
    """
    try:
        return SOURCES[name]
    except KeyError:
        raise ValueError(f"unknown source {name!r}; known: {', '.join(SOURCES)}") from None


__all__ = ["SOURCES", "Source", "SourceOptions", "get_source"]
