"""Loading the reference model and building each quantized variant from a registry of recipes."""
