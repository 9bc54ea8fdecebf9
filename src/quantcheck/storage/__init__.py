"""What a run keeps on disk: the run folder's layout and its append-only records, the compact reference store."""
