"""THE held-out benchmark table: every benchmark the factory keeps out of training and evaluates on.

One :class:`Benchmark` per held-out benchmark of ``../shared/data`` (its README's "Benchmark TEST
sets" table), read by both sides:

* decontamination (:mod:`octomed_data.registry`) reads every :class:`HeldOutFile`: the canonical
  file of a benchmark defines its items and ids, the other copies (5-option variants, evaluation
  bundles, official subsets, per-language CSVs) link back to them; ``reader`` names the registry's
  reader (:data:`octomed_data.registry.READERS`) and ``items`` is the number of distinct held-out
  items the data README lists;
* evaluation (:mod:`evaluation.benchmarks`) reads every :class:`EvalSet`: the file(s) of one scored
  test set and the source loader (``fmt``, a key of :data:`octomed_data.sources.FORMATS`) that
  reads them, so evaluation and ingest parse every file the same way.

Paths are relative to the benchmark data folder, or ``package:<path>`` for a benchmark shipped in the
package (the recipe lab's held-out imaging classification, :data:`LAB_IMAGING_FILE`): read from the
package whatever the data folder, by decontamination and evaluation alike (:func:`benchmark_path`).
This module is data only (no I/O, no imports of readers), so both sides can import it without
importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from octomed_data.schema import TaskType

PAPER_CITATION = "OctoMed, arXiv 2511.23269"

PACKAGE_PREFIX = "package:"
_PACKAGE_ROOT = Path(__file__).resolve().parent

# The recipe lab's held-out imaging classification: the bundled imaging labels (the demo's and the
# lab's ``imaging_modality`` source, pydicom / nibabel test files, MIT) read as the source reads them
# (3 images per label, seed 0), its records NOT sampled for training being the test split
# (``rest: test``). Both sides read it with these options, so the items are the same.
LAB_IMAGING = "imaging_cls_lab"
LAB_IMAGING_FILE = PACKAGE_PREFIX + "sample_data/imaging/labels.csv"
LAB_IMAGING_OPTIONS: dict[str, Any] = {"per_class": 3, "seed": 0, "rest": "test"}


def benchmark_path(data_dir: Path, rel: str) -> Path:
    """Where a table path is: under ``data_dir``, or in the package for ``package:<path>``."""
    if rel.startswith(PACKAGE_PREFIX):
        return _PACKAGE_ROOT / rel.removeprefix(PACKAGE_PREFIX)
    return Path(data_dir) / rel


@dataclass(frozen=True)
class HeldOutFile:
    """One held-out file decontamination reads."""

    file: str  # relative to the data folder
    reader: str  # a key of octomed_data.registry.READERS
    canonical: bool  # canonical files define item ids; copies link to them
    records: int | None = None  # records the data README lists for this file


@dataclass(frozen=True)
class EvalSet:
    """One scored test set: where its file is and which source loader reads it."""

    name: str
    title: str
    fmt: str  # a key of octomed_data.sources.FORMATS
    files: tuple[str, ...]  # relative to the data folder; the first that exists is read ...
    images: str | None = None  # image folder relative to the data folder (absent here: items skipped)
    split: str | None = "test"  # keep only rows the loader put in this split; None: every row
    all_files: bool = False  # ... or, when True, every listed file is read (SLAKE open + closed)
    paper_octomed_7b: float | None = None  # accuracy (%) the paper reports for OctoMed-7B
    note: str = ""
    missing_hint: str = ""  # what to do when the file is not there (PMC-VQA)
    options: dict[str, Any] = field(default_factory=dict)  # extra loader options

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "format": self.fmt,
            "files": list(self.files),
            "images": self.images,
            "split": self.split,
            "paper_octomed_7b": self.paper_octomed_7b,
            "note": self.note,
        }


@dataclass(frozen=True)
class Benchmark:
    """One held-out benchmark: its files for decontamination and its test sets for evaluation."""

    name: str  # the registry's benchmark name (the ``benchmark`` column of the registry pack)
    title: str
    task_types: tuple[TaskType, ...]  # the kinds of question its items are
    image_grounded: bool = False
    items: int | None = None  # distinct held-out items the data README lists (None: not in the registry)
    held_out: tuple[HeldOutFile, ...] = ()  # () : not in the decontamination registry
    evaluation: tuple[EvalSet, ...] = ()


_T, _Y, _MM, _OPEN = TaskType.TEXT_MCQ, TaskType.YES_NO_MAYBE, TaskType.MM_MCQ, TaskType.OPEN_VQA
_CLS = TaskType.IMAGING_CLS
_MMLU_SUBJECTS = (
    ("anatomy", 135),
    ("clinical_knowledge", 265),
    ("college_biology", 144),
    ("college_medicine", 173),
    ("medical_genetics", 100),
    ("professional_medicine", 272),
)

BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark(
        "medqa", "MedQA-USMLE", (_T,), items=1273,
        held_out=(
            HeldOutFile("medqa/phrases_no_exclude_test.jsonl", "medqa", True, 1273),
            HeldOutFile("medqa/medqa_test_5opt.jsonl", "medqa", False, 1273),
            HeldOutFile("huatuogpt_o1_eval/MedQA_USLME_test.json", "huatuo", False, 1273),
            HeldOutFile("medqa/medqa_input.head200.jsonl", "eval_input", False, 200),
        ),
        evaluation=(
            EvalSet(
                "medqa", "MedQA-USMLE (4 options)", "medqa", ("medqa/phrases_no_exclude_test.jsonl",),
                paper_octomed_7b=90.81,
            ),
        ),
    ),
    Benchmark(
        "medmcqa", "MedMCQA", (_T,), items=4183,
        held_out=(
            HeldOutFile("medmcqa/dev.json", "medmcqa", True, 4183),
            HeldOutFile("huatuogpt_o1_eval/MedMCQA_validation.json", "huatuo", False, 4183),
            HeldOutFile("medmcqa/medmcqa_input.head500.jsonl", "eval_input", False, 500),
        ),
        evaluation=(
            EvalSet("medmcqa", "MedMCQA dev", "medmcqa", ("medmcqa/dev.json",), split="dev", paper_octomed_7b=72.70),
        ),
    ),
    Benchmark(
        "pubmedqa", "PubMedQA PQA-L", (_Y,), items=1000,  # all 1000 PQA-L items are held out
        held_out=(
            HeldOutFile("pubmedqa/ori_pqal.json", "pubmedqa", True, 1000),
            HeldOutFile("huatuogpt_o1_eval/PubMedQA_test.json", "huatuo", False, 1000),
        ),
        evaluation=(
            EvalSet(
                "pubmedqa", "PubMedQA PQA-L test (500)", "pubmedqa", ("pubmedqa/ori_pqal.json",),
                note="the 500 ids of test_ground_truth.json; the other 500 PQA-L items are excluded",
            ),
        ),
    ),
    Benchmark(
        "mmlu_medical", "MMLU medical (6 subjects)", (_T,), items=1089,
        held_out=(
            *(HeldOutFile(f"mmlu_medical/{s}_test.csv", "mmlu_csv", True, n) for s, n in _MMLU_SUBJECTS),
            HeldOutFile("mmlu_medical/mmlu_medical_input.jsonl", "eval_input", False, 1089),
        ),
        evaluation=(
            EvalSet(
                "mmlu_medical", "MMLU medical (6 subjects)", "mmlu", ("mmlu_medical",),
                note="anatomy, clinical_knowledge, college_biology, college_medicine, medical_genetics, "
                "professional_medicine",
            ),
        ),
    ),
    Benchmark(
        "mmlu_pro_medical", "MMLU-Pro medical", (_T,), items=1535,
        held_out=(HeldOutFile("huatuogpt_o1_eval/MMLU-Pro_Medical_test.json", "huatuo", True, 1535),),
        evaluation=(
            EvalSet(
                "mmlu_pro_medical", "MMLU-Pro medical", "mmlu_pro", ("huatuogpt_o1_eval/MMLU-Pro_Medical_test.json",)
            ),
        ),
    ),
    Benchmark(
        "medxpertqa_text", "MedXpertQA Text", (_T,), items=2450,
        held_out=(
            HeldOutFile("medxpertqa/medxpertqa_text.jsonl", "medxpertqa_hf", True, 2450),
            HeldOutFile("medxpertqa/medxpertqa_sampled_text_input.jsonl", "eval_input", False, 244),
        ),
        evaluation=(
            EvalSet(
                "medxpertqa_text", "MedXpertQA Text", "medxpertqa", ("medxpertqa/medxpertqa_text.jsonl",),
                paper_octomed_7b=24.51,
            ),
        ),
    ),
    Benchmark(
        "medxpertqa_mm", "MedXpertQA MM", (_MM,), image_grounded=True, items=2000,
        held_out=(
            HeldOutFile("medxpertqa/medxpertqa_mm_input.jsonl", "eval_input", True, 2000),
            HeldOutFile("medxpertqa/medxpertqa_sampled_mm_input.jsonl", "eval_input", False, 199),
        ),
        evaluation=(
            EvalSet(
                "medxpertqa_mm", "MedXpertQA MM", "medxpertqa", ("medxpertqa/medxpertqa_mm_input.jsonl",),
                images="medxpertqa/images", paper_octomed_7b=36.65,
                note="images are distributed only in the HF dataset's zip: put them in medxpertqa/images",
            ),
        ),
    ),
    Benchmark(
        "medbullets", "MedBullets", (_T,), items=308,
        held_out=(
            HeldOutFile("medreason_eval/medbullets_op4.jsonl", "medbullets", True, 308),
            HeldOutFile("medreason_eval/medbullets_op5.jsonl", "medbullets", False, 308),
        ),
        evaluation=(
            EvalSet("medbullets_op4", "MedBullets (4 options)", "medbullets", ("medreason_eval/medbullets_op4.jsonl",)),
            EvalSet("medbullets_op5", "MedBullets (5 options)", "medbullets", ("medreason_eval/medbullets_op5.jsonl",)),
        ),
    ),
    Benchmark(
        "vqa_rad", "VQA-RAD", (_Y, _OPEN), image_grounded=True, items=451,
        held_out=(
            HeldOutFile("vqa_rad/testset.json", "vqa_rad_testset", True, 451),
            HeldOutFile("vqa_rad/VQA_RAD_Dataset_Public.json", "vqa_rad_public", False, 451),
        ),
        evaluation=(
            EvalSet(
                "vqa_rad", "VQA-RAD test", "vqa_rad", ("vqa_rad/testset.json",), images="vqa_rad/images",
                note="closed yes/no -> yes_no_maybe, open answers -> open_vqa (exact match + token F1)",
            ),
        ),
    ),
    Benchmark(
        "slake", "SLAKE 1.0", (_Y, _OPEN), image_grounded=True, items=2094,
        held_out=(
            HeldOutFile("slake/test.json", "slake_json", True, 2094),
            HeldOutFile("slake/test_open.csv", "slake_csv", False, 645),
            HeldOutFile("slake/test_close.csv", "slake_csv", False, 416),
        ),
        evaluation=(
            EvalSet(
                "slake", "SLAKE 1.0 test (English)", "slake", ("slake/test_open.csv", "slake/test_close.csv"),
                images="slake/imgs", all_files=True,
                note="images are not public in git: put the xmlab* folders in slake/imgs",
            ),
        ),
    ),
    Benchmark(
        "pathvqa", "PathVQA", (_Y, _OPEN), image_grounded=True, items=6761,
        held_out=(HeldOutFile("pathvqa/pvqa_test.json", "pathvqa", True, 6761),),
        evaluation=(
            EvalSet(
                "pathvqa", "PathVQA test", "pathvqa", ("pathvqa/pvqa_test.json",), images="pathvqa/images",
                note="images are copyrighted and not here: put <img_id>.jpg in pathvqa/images",
            ),
        ),
    ),
    Benchmark(
        "omnimedvqa", "OmniMedVQA", (_MM,), image_grounded=True, items=900 + 1615,
        held_out=(
            HeldOutFile("omnimedvqa/MRI_CT_XRAY_300each_dataset.json", "omnimed_medvlm", True, 900),
            HeldOutFile("omnimedvqa/med_r1_splits/X-Ray_test.json", "omnimed_med_r1", True, 1615),
        ),
        evaluation=(
            EvalSet(
                "omnimedvqa", "OmniMedVQA (MedVLM-R1 MR/CT/X-ray 900)", "omnimedvqa",
                ("omnimedvqa/MRI_CT_XRAY_300each_dataset.json",), images="omnimedvqa",
                note="11 of the 900 images are public in git (omnimedvqa/images); the rest are skipped",
            ),
            EvalSet(
                "omnimedvqa_xray", "OmniMedVQA X-ray test (Med-R1 split)", "omnimedvqa",
                ("omnimedvqa/med_r1_splits/X-Ray_test.json",), images="omnimedvqa",
            ),
        ),
    ),
    Benchmark(
        # Distributed on the HF hub only: not in ../shared/data, so not in the registry pack.
        "pmc_vqa", "PMC-VQA", (_MM,), image_grounded=True,
        evaluation=(
            EvalSet(
                "pmc_vqa", "PMC-VQA test", "pmc_vqa", ("pmc_vqa/test_clean.csv", "pmc_vqa/test.csv"),
                images="pmc_vqa/images", split=None, paper_octomed_7b=61.13,
                missing_hint="PMC-VQA is distributed on the HF hub only (xmcmic/PMC-VQA): put test_clean.csv "
                "(or test.csv) in <data-dir>/pmc_vqa/ and the figures in <data-dir>/pmc_vqa/images/",
            ),
        ),
    ),
    Benchmark(
        # Shipped in the package: the imaging labels' records the lab's training sample leaves out
        # (4 MR images: 3 pixel copies of MR_small in other DICOM encodings, and anatomical.nii). A
        # CPU demo of the classification group, not a benchmark worth a number.
        LAB_IMAGING, "Lab imaging modality classification (held out)", (_CLS,), image_grounded=True,
        items=4,
        held_out=(HeldOutFile(LAB_IMAGING_FILE, "imaging_held_out", True, 4),),
        evaluation=(
            EvalSet(
                LAB_IMAGING, "Lab imaging modality classification (held-out images)", "imaging",
                (LAB_IMAGING_FILE,), options=dict(LAB_IMAGING_OPTIONS),
                note="the bundled imaging labels not sampled for training (rest: test); a CPU demo",
            ),
        ),
    ),
)  # fmt: skip


def eval_sets() -> dict[str, EvalSet]:
    """Every scored test set by name, in table order."""
    return {e.name: e for b in BENCHMARKS for e in b.evaluation}


def held_out_files() -> list[tuple[Benchmark, HeldOutFile]]:
    """Every held-out file with its benchmark, in table order."""
    return [(b, f) for b in BENCHMARKS for f in b.held_out]


def expected_items() -> dict[str, int]:
    """Distinct held-out items per registry benchmark, as the data README lists them."""
    return {b.name: b.items for b in BENCHMARKS if b.held_out and b.items is not None}
