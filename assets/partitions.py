"""Partitions: one per source family, so each source normalizes (and fails) on its own."""

from __future__ import annotations

import dagster as dg

from pipeline.sources import SOURCES

source_partitions = dg.StaticPartitionsDefinition(list(SOURCES))
