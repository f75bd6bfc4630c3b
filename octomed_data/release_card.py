"""The dataset card of a release: ``README.md`` with Hugging Face YAML metadata, from the run's stats.

Every number on the card comes from the run's own statistics (``filter/stats.json``, the one
statistics pass the report reads too) or from what :func:`octomed_data.release.release` counted
while writing; licences come from :data:`SOURCE_LICENSES` (per source format, as the upstreams state
them in ``../shared/data/README.md``), overridable per source by the recipe's ``release.licenses``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa
import yaml

from octomed_data import storage
from octomed_data.decontam.text import NGRAM
from octomed_data.prompts import SYSTEM_PROMPTS
from octomed_data.recipe import Recipe
from octomed_data.registry import BUNDLED_REGISTRY, load_registry, registry_counts
from octomed_data.teachers import TeacherConfig, is_simulated

# Per source format: (Hugging Face licence id, note). "unknown": no licence stated upstream.
SOURCE_LICENSES: dict[str, tuple[str, str]] = {
    "medqa": ("mit", "MedQA, Copyright (c) 2022 Di Jin"),
    "medmcqa": ("mit", "MedMCQA, Copyright (c) 2022 MedMCQA"),
    "pubmedqa": ("mit", "PubMedQA, Copyright (c) 2019 pubmedqa"),
    "mmlu": ("mit", "MMLU (hendrycks/test)"),
    "mmlu_pro": ("unknown", "MMLU-Pro: not verified (the TIGER-Lab card is commonly MIT)"),
    "medxpertqa": ("mit", "MedXpertQA (TsinghuaC3I)"),
    "medbullets": ("unknown", "no licence stated upstream; questions from medbullets.com"),
    "vqa_rad": ("unknown", "no licence in the OSF Readme (commonly reported CC0 1.0); images from MedPix"),
    "slake": ("unknown", "no SLAKE data licence stated in the copy used; check med-vqa.com/slake"),
    "pathvqa": ("mit", "repo MIT; image and caption copyrights belong to the books' publishers and PEIR"),
    "omnimedvqa": ("unknown", "no licence file; RadImageNet / MIAS images carry their own terms"),
    "pmc_vqa": ("unknown", "not verified here; check the xmcmic/PMC-VQA dataset card"),
    "headqa": ("unknown", "not verified here; check the HEAD-QA terms"),
    "imaging": ("unknown", "your own imaging files: set release.licenses in the recipe"),
}
_SIZES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"))


def registry_uri(registry: str | None) -> str:
    """The registry pack a release checks against (None: the bundled one)."""
    return registry or str(BUNDLED_REGISTRY)


def registry_info(registry: str | None) -> tuple[pa.Table, dict[str, Any]]:
    """The registry table and what the card says of it: where, SHA-256 of the pack, items."""
    uri = registry_uri(registry)
    table = load_registry(uri)
    digest = hashlib.sha256(storage.read_bytes(uri)).hexdigest()
    info = {
        "registry": registry or "bundled (octomed_data/registry/benchmarks.parquet)",
        "sha256": digest,
        "rows": table.num_rows,
        "benchmarks": registry_counts(table),
    }
    return table, info


def source_formats(recipe: Recipe) -> dict[str, str]:
    """Source name (the ``source`` column) -> the format it was read as, from the recipe's entries."""
    out: dict[str, str] = {}
    try:
        entries = recipe.ingest_entries()
    except Exception:  # the recipe's sources file moved since the run: formats by name only
        entries = []
    for e in entries:
        name = e.get("source") or (e.get("options") or {}).get("source") or e["format"]
        out.setdefault(str(name), e["format"])
    return out


def licence_of(source: str, fmt: str | None, overrides: Mapping[str, str]) -> tuple[str, str]:
    """(licence id, note) of a source: the recipe's override, else its format's, else unknown."""
    if source in overrides:
        return overrides[source], "set in the recipe (release.licenses)"
    return SOURCE_LICENSES.get(fmt or source, SOURCE_LICENSES.get(source, ("unknown", "format not known")))


def size_category(n: int) -> str:
    for bound, name in _SIZES:
        if n < bound:
            return name
    return "n>1M"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _table(header: list[str], rows: Iterable[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return lines + [""]


def render_card(
    recipe: Recipe,
    stats: Mapping[str, Any],
    summary: Mapping[str, Any],
    teachers: list[TeacherConfig],
    *,
    licenses: Mapping[str, str] | None = None,
    dataset_info: Mapping[str, Any] | None = None,
) -> str:
    """The ``README.md`` of a release (YAML front matter + body) from the run's stats and the release.

    ``dataset_info``: the features and split sizes as ``datasets`` reads them (``name``,
    ``num_bytes``, ``num_examples`` per split; :func:`octomed_data.release.dataset_info`); without
    it the split holds the row count and no byte size is claimed (0)."""
    overrides = dict(licenses or {})
    formats = source_formats(recipe)
    per_source = summary["per_source"]
    sources = sorted(set(per_source) | set(stats.get("sources", {})))
    licences = {s: licence_of(s, formats.get(s), overrides) for s in sources}
    distinct = sorted({lic for lic, _ in licences.values()})
    n = f"pass@{stats.get('samples_per_question') or 'N'}"
    rows, responses = summary["rows"], summary["responses"]
    multimodal = any(
        t in ("mm_mcq", "imaging_cls", "open_vqa") for t in stats.get("reasoning_words_by_task", {})
    )
    meta: dict[str, Any] = {
        "license": distinct[0] if len(distinct) == 1 else "other",
        **({"license_name": "mixed (per source, see the card)"} if len(distinct) > 1 else {}),
        "pretty_name": f"{recipe.name} distilled medical reasoning (run {summary['run_id']})",
        "task_categories": ["question-answering", "text-generation"]
        + (["visual-question-answering"] if multimodal else []),
        "tags": ["medical", "reasoning", "distillation", "rejection-sampling", "synthetic", "octomed"],
        "size_categories": [size_category(rows)],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}],
        "dataset_info": dict(dataset_info)
        if dataset_info
        else {"splits": [{"name": "train", "num_bytes": 0, "num_examples": rows}]},
    }
    used = stats.get("teachers", {})
    by_name: dict[str, TeacherConfig] = {}
    for t in teachers:
        by_name.setdefault(t.name, t)
    kind = (
        "every judged response (accepted and rejected)"
        if summary["all_responses"]
        else "the accepted responses"
    )
    with_images = bool(summary.get("with_images"))
    body = [
        f"# {meta['pretty_name']}",
        "",
        f"Medical questions with {kind} of the teacher model(s) below, distilled with the OctoMed recipe "
        "(N reasoning traces per question, rejection sampling against the gold answer, decontamination "
        f"against held-out benchmarks). Run `{summary['run_id']}` of recipe `{recipe.name}`; release "
        f"format {summary['release_version']}.",
        "",
        "## Sizes",
        "",
        *_table(
            ["what", "count"],
            [
                ["questions (rows)", rows],
                ["responses in this release", responses],
                [
                    "images included (pixels)",
                    summary.get("images", 0) if with_images else "no (references only)",
                ],
                ["samples judged in the run", stats["overall"]["samples"]],
                ["accepted samples in the run", stats["overall"]["accepted"]],
                ["failed requests (not samples)", stats["overall"]["failed_requests"]],
                ["questions excluded at release (benchmark match)", len(summary["excluded"])],
            ],
        ),
        "## Sources and licences",
        "",
        "Licences as the upstreams state them; `unknown` means none is stated: check before redistributing.",
        "",
        *_table(
            [
                "source",
                "format",
                "licence",
                "released rows",
                "responses",
                "questions",
                "samples",
                "accepted",
                "pass rate",
                n,
                "without accepted",
                "too easy",
            ],  # fmt: skip
            [
                [
                    s,
                    formats.get(s, "–"),
                    licences[s][0],
                    per_source.get(s, {}).get("rows", 0),
                    per_source.get(s, {}).get("responses", 0),
                    st.get("questions", 0),
                    st.get("samples", 0),
                    st.get("accepted", 0),
                    _pct(st.get("pass_rate")),
                    _pct(st.get(n)),
                    st.get("questions_without_accepted", 0),
                    "yes" if st.get("too_easy") else "no",
                ]  # fmt: skip
                for s in sources
                for st in [stats.get("sources", {}).get(s, {})]
            ],
        ),
        *[f"- `{s}`: {note}" for s, (_, note) in licences.items()],
        "",
        *_decontam_section(recipe, summary),
        *_verification_section(stats, summary),
        "## Teachers and prompts",
        "",
        *_table(
            ["teacher", "model", "samples", "temperature", "top_p", "max_tokens"],
            [
                [name, t.model, count, t.temperature, t.top_p, t.max_tokens]
                if t
                else [name, "–", count, "–", "–", "–"]
                for name, count in used.items()
                for t in [by_name.get(name)]
            ],
        ),
        f"Samples per question: {stats.get('samples_per_question') or recipe.distill.samples}; seed "
        f"{recipe.distill.seed}; prompt version(s): {', '.join(summary['prompt_versions']) or '–'}. "
        "System prompts by answer form:",
        "",
        *[f"- {form}: `{text}`" for form, text in SYSTEM_PROMPTS.items()],
        "",
        *_fields_section(with_images),
        *_limitations(stats, summary, licences, used),
    ]
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000)
    return f"---\n{front}---\n\n" + "\n".join(body).rstrip() + "\n"


def _decontam_section(recipe: Recipe, summary: Mapping[str, Any]) -> list[str]:
    reg = summary["registry"]
    d = recipe.decontam
    removed = summary.get("decontam_removed", {})
    lines = [
        "## Decontamination",
        "",
        f"Method: {NGRAM}-gram overlap of normalised question text (shorter items: whole-item equality "
        f"plus options, `short_match: {d.short_match}`), exact image SHA-256 and perceptual hash "
        f"(Hamming distance <= {d.phash_threshold}). The run's stage was "
        f"{'on' if d.enabled else 'OFF'} and removed {sum(removed.values())} question(s); the release "
        f"checked every question again and excluded {len(summary['excluded'])}.",
        "",
        f"Registry: {reg['registry']}, SHA-256 `{reg['sha256']}`, {reg['rows']} rows.",
        "",
    ]
    return lines + _table(
        ["benchmark", "registry items", "registry images", "removed by the run", "excluded at release"],
        [
            [
                b,
                c["items"],
                c["images"],
                removed.get(b, 0),
                sum(e["benchmark"] == b for e in summary["excluded"]),
            ]
            for b, c in reg["benchmarks"].items()
        ],
    )


def _rate(summary: Mapping[str, Any], key: str) -> float | None:
    """A calibration rate; the false-accept rate of stats written before it was recorded is
    computed from the counts (fp / (fp + tn))."""
    if key == "false_accept_rate" and summary.get(key) is None:
        wrong = (summary.get("fp") or 0) + (summary.get("tn") or 0)
        return round(summary["fp"] / wrong, 4) if wrong else None
    return summary.get(key)


def _verification_section(stats: Mapping[str, Any], summary: Mapping[str, Any]) -> list[str]:
    """How each answer was checked: the verify settings, accepted responses per verifier, and the
    LLM judge's calibration per source (its false-accept rate is what carries over to open answers)."""
    v = stats.get("verifier") or {}
    settings = v.get("settings") or {}
    judge = v.get("judge") or {}
    per_source = summary["per_source"]
    sources = sorted(set(per_source) | set(v.get("verified_by") or {}))
    modes = settings.get("sources") or {}

    def mode(src: str) -> str:
        entry = modes.get(src) or {}
        return entry.get("mode") or settings.get("default") or "exact"

    lines = [
        "## Verification",
        "",
        "Multiple-choice and yes/no/maybe answers are checked by exact match of the extracted label. "
        "Open-ended answers are checked per source: `exact` (normalised text equality), `normalized` "
        "(numbers and units, plurals, medical synonyms) or `judge` (what `normalized` does not "
        "accept goes to an LLM judge). Each response's `verifier` field names the check that decided it.",
        "",
    ]
    if judge:
        lines += [
            f"Judge: teacher `{judge.get('name')}`, model `{judge.get('model')}`, rubric version "
            f"{judge.get('rubric_version')}; verify settings fingerprint `{v.get('fingerprint')}`.",
            "",
        ]
    lines += _table(
        [
            "source",
            "open answers checked by",
            "accepted by exact",
            "accepted by normalized",
            "accepted by judge",
        ],
        [
            [
                s,
                mode(s),
                per_source.get(s, {}).get("accepted_by_exact", 0),
                per_source.get(s, {}).get("accepted_by_normalized", 0),
                per_source.get(s, {}).get("accepted_by_judge", 0),
            ]
            for s in sources
        ],
    )
    calibration = v.get("calibration") or {}
    if not calibration:
        return lines
    lines += [
        "**Judge calibration.** Closed replies (where exact match is the truth) were also sent to the "
        "judge as if open-ended. Precision: of the replies the judge accepts, the share that are right. "
        "**False-accept rate**: of the wrong replies, the share the judge accepts (fp / (fp + tn)); it "
        "does not depend on how many replies are right, so it is the estimate that carries over to the "
        "wrong open-ended answers the judge decides.",
        "",
    ]
    lines += _table(
        ["source", "judged", "precision", "recall", "false-accept rate", "agreement", "kappa", "fp", "tn"],
        [
            [
                s,
                c.get("judged", 0),
                _pct(c.get("precision")),
                _pct(c.get("recall")),
                _pct(_rate(c, "false_accept_rate")),
                _pct(c.get("agreement")),
                "–" if c.get("kappa") is None else c["kappa"],
                c.get("fp", 0),
                c.get("tn", 0),
            ]
            for s, c in calibration.items()
        ],
    )
    return lines


def _fields_section(with_images: bool = False) -> list[str]:
    images = (
        "`images` (a list of `datasets.Image`: the PNG bytes are in the Parquet rows and decode to PIL "
        "images; normalised to at most 262,144 pixels, re-encoded with no metadata), `image_refs` "
        "[{sha256, phash, width, height, path}] (the same images' content addresses)"
        if with_images
        else "`images` [{sha256, phash, width, height, path}] (references only: no pixels)"
    )
    return [
        "## Fields",
        "",
        "`question_id` (content hash), `source`, `source_split`, `task_type`, `modality`, `anatomy`, "
        f"`question`, `options` [{{label, text}}], `answer` (gold), `answer_text`, {images}, "
        "`metadata` (JSON, patient fields removed), "
        "`source_file`, `record_index`, `num_samples`, `num_accepted`, `responses` [{sample_idx, teacher, "
        "model, prompt_version, params_hash, seed, temperature, top_p, max_tokens, extra_body, reasoning, "
        "response, extracted_answer, extraction_method, correct, reject_reason, finish_reason, "
        "prompt_tokens, completion_tokens, verifier, verifier_rule, judge_correct}]. `verifier` says "
        "which check accepted or rejected the answer (`exact`, `normalized`, or `judge`: an LLM "
        "judge), `verifier_rule` why it matched, `judge_correct` the judge's own verdict when it was "
        "asked (also on closed questions used to calibrate it).",
        "",
        "```python",
        "from datasets import load_dataset",
        'ds = load_dataset("<release folder>", split="train")  # or the Hub repository',
        'ds = load_dataset("parquet", data_files="<release>/data/train-*.parquet", split="train")',
        *(['ds[0]["images"][0]  # a PIL image'] if with_images else []),
        "```",
        "",
    ]


def _limitations(
    stats: Mapping[str, Any],
    summary: Mapping[str, Any],
    licences: Mapping[str, tuple[str, str]],
    used: Mapping[str, int],
) -> list[str]:
    out = [
        "## Known limitations",
        "",
        "- Responses are machine-generated and not reviewed by clinicians. Rejection sampling checks "
        "only the final answer: an accepted trace can reason wrongly and still end in the right answer.",
        "- Images are included as the factory normalised them (at most 262,144 pixels, 8-bit L or RGB, "
        "PNG without metadata), not as the sources published them."
        if summary.get("with_images")
        else "- Images are not included: only their hashes and content-addressed paths "
        "(`images/ab/<sha256>.png` in the producing run's image store). Obtain pixels from the sources.",
        "- Decontamination covers the registry's benchmarks only; image matching needs the benchmark "
        "images, which the registry holds only where they were available.",
    ]
    unknown = [s for s, (lic, _) in licences.items() if lic == "unknown"]
    if unknown:
        out.append(f"- No verified licence for: {', '.join(unknown)}. Check before redistributing.")
    easy = [s for s, st in stats.get("sources", {}).items() if st.get("too_easy")]
    if easy:
        out.append(f"- Rejection rate below 30% (too easy, or an overconfident teacher): {', '.join(easy)}.")
    without = sum(s.get("without_accepted", 0) for s in summary["per_source"].values())
    if without:
        out.append(f"- {without} released question(s) have no accepted response.")
    by_judge = sum(s.get("accepted_by_judge", 0) for s in summary["per_source"].values())
    if by_judge:
        cal = ((stats.get("verifier") or {}).get("calibration") or {}).get("overall") or {}
        far = _rate(cal, "false_accept_rate") if cal else None
        out.append(
            f"- {by_judge} accepted response(s) were accepted by the LLM judge (`verifier: judge`), not "
            "by an exact or normalized match"
            + (f"; its false-accept rate on closed replies was {_pct(far)}." if far is not None else ".")
        )
    if summary.get("unknown_sampling_params"):
        out.append(f"- {summary['unknown_sampling_params']} response(s) lack recorded sampling params.")
    if any(is_simulated(t) for t in used):
        out.append("- Responses by teacher `sandbox` come from the factory's loopback test teacher: they "
                   "are NOT model traces and must not be used for training.")  # fmt: skip
    return out + [""]
