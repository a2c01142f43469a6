"""Adapters of :mod:`oneepoch.monitor` to training frameworks (optional extras)."""
