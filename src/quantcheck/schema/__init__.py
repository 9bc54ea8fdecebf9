"""The bottom layer: results.json's models, the compared models' description and the thresholds; imports nothing of
quantcheck's."""
