"""What a run writes: the results schema and the durable files of a run folder."""
