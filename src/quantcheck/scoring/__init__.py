"""Scoring: log-likelihood and next-token rows at answer positions, every token of a corpus, free generation, and the
engine's numeric floor. Each works through a backend's small interface."""
