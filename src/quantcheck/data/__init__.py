"""Multiple-choice data sets: MMLU subjects and user files, and the prompt formats built from them."""
