"""Reading a run: summaries, divergence and corpus statistics, the verdict, and the wording of numbers. Reads the
schema and the run folder, never an engine."""
