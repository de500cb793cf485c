"""Slow, obviously-correct implementations used only as test oracles."""
