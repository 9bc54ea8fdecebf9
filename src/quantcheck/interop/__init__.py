"""Reading and writing other evaluation tools' per-sample outputs (lm-evaluation-harness)."""
