"""Confidence intervals and paired tests, so every number in a verdict carries its uncertainty."""
