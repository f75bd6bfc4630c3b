"""Check the LLaMA-Factory export with the real LLaMA-Factory, in its own cached venv.

LLaMA-Factory cannot share this project's pins (0.9.5 wants transformers<=5.6, datasets<=4.0), so
it gets its own venv under ``~/.cache/octomed-data/llamafactory-<version>``, built once: torch
2.13.0 first (the CPU wheel on these machines; any other torch pin downloads GBs of CUDA), then
llamafactory with its own pins, then the registry's torchvision/torchaudio are removed (CUDA builds
that break on import here; the worker stubs torchaudio and uses the PIL image processor).

The check: export a mixture (or take ``--export``), copy ``export/llamafactory`` ALONE to a fresh
folder, and there run LLaMA-Factory's ``get_dataset`` (``qwen2_vl`` template and mm_plugin) over
every exported row of both splits (image blocks == images, images found, ``<think>``, the answer
line in the labels, the system turn used), then one SFT step on a tiny Qwen2.5-VL
(``benchmarks/llamafactory_worker.py``). ``--text-only``: the text-only datasets
(``octomed_text_*``, no images column) with the ``qwen`` template and two SFT steps on a tiny
text-only Qwen2, which refuses any image input. Prints one JSON summary; exit 0 when everything
holds. A venv that cannot be built is one line on stderr and exit 2, never a skip.

    python benchmarks/check_llamafactory.py [--export RUN/export] [--text-only] [--version 0.9.5] [--rebuild]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from octomed_data.venvs import VenvBuildError as BuildError  # noqa: E402  (the test names it so)
from octomed_data.venvs import cached_venv  # noqa: E402

VERSION = "0.9.5"
TORCH = "torch==2.13.0"
WORKER = Path(__file__).resolve().parent / "llamafactory_worker.py"


# Variables a launcher sets per process: inherited from a job that ran in this process (an
# in-process SFT or GRPO run sets them), they would send LLaMA-Factory's trainer to a dead store.
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def worker_env() -> dict[str, str]:
    """The LLaMA-Factory worker's environment: this one without PYTHONPATH and launcher variables."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS and not k.startswith("TORCHELASTIC_")}
    return env | {"PYTHONPATH": "", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def ensure_venv(version: str = VERSION, rebuild: bool = False) -> tuple[Path, float]:
    """LLaMA-Factory's venv (built once, reused while its ready marker is there); (python, build seconds)."""
    python, seconds = cached_venv(
        f"llamafactory-{version}",
        [[TORCH], [f"llamafactory=={version}", TORCH]],
        remove=("torchvision", "torchaudio"),
        rebuild=rebuild,
        log=lambda m: print(m, file=sys.stderr),
    )
    return Path(python), seconds


def _fixture_export(work: Path) -> Path:
    """A small export from the shared benchmark files (text + image questions); returns its folder."""
    from octomed_data.export import export
    from octomed_data.mixture import MixtureConfig, build_mixture
    from tests.conftest import _shared_data_dir
    from tests.support.orchestration import write_inputs

    accepted, questions = write_inputs(_shared_data_dir(), str(work / "in"), n_text=8, n_image=3)
    mix = build_mixture(accepted, questions, str(work / "mix"), MixtureConfig(validation_fraction=0.25))
    export(mix.uri, str(work / "export"), formats=["llamafactory"])
    return work / "export"


def check(
    export_dir: str | None,
    version: str = VERSION,
    rebuild: bool = False,
    keep: bool = False,
    text_only: bool = False,
) -> dict:
    from octomed_data import storage
    from octomed_data.export_formats import llamafactory_text_split
    from training.tiny import build_text_model, build_vl_model

    mode, steps = ("text", 2) if text_only else ("vision", 1)

    python, build_s = ensure_venv(version, rebuild)
    work = Path(tempfile.mkdtemp(prefix="octomed-lf-"))
    try:
        t0 = time.time()
        run = work / "run"
        source = Path(export_dir) if export_dir else _fixture_export(run)
        lf_source = source / "llamafactory" if (source / "llamafactory").is_dir() else source
        expected = {}
        for split in ("train", "validation"):
            split_dir = (
                llamafactory_text_split(str(lf_source), split) if text_only else str(lf_source / split)
            )
            expected[split] = storage.Dataset(split_dir).num_rows()
        dataset_dir = work / "copied" / "llamafactory"  # the folder alone, somewhere else
        shutil.copytree(lf_source, dataset_dir)
        if not export_dir:
            shutil.rmtree(run)  # nothing of the run is left but the copy
        (build_text_model if text_only else build_vl_model)(work / "model")
        prep_s = round(time.time() - t0, 1)
        t1 = time.time()
        proc = subprocess.run(
            [str(python), str(WORKER), str(dataset_dir), str(work / "model"), str(work / "out"), mode],
            capture_output=True,
            text=True,
            timeout=900,
            cwd=str(work),
            env=worker_env(),
        )
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("OCTOMED_RESULT ")), None)
        if proc.returncode != 0 or line is None:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
            return {"ok": False, "error": f"worker exit {proc.returncode}", "log_tail": tail}
        report = json.loads(line.removeprefix("OCTOMED_RESULT "))
        problems = []
        for split, n in expected.items():
            got = report["splits"][split]
            if got["rows"] != n:
                problems.append(f"{split}: LLaMA-Factory loaded {got['rows']} of {n} rows")
            if got["bad"]:
                problems.append(f"{split}: {len(got['bad'])} bad rows, first {got['bad'][0]}")
        if report.get("global_step") != steps:
            problems.append(f"training did not take {steps} step(s): {report.get('global_step')}")
        return {
            "ok": not problems,
            "problems": problems,
            "llamafactory": version,
            "mode": mode,
            "venv": str(python.parent.parent),
            "venv_build_s": build_s,
            "prepare_s": prep_s,
            "worker_s": round(time.time() - t1, 1),
            "exported_rows": expected,
            **report,
        }
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--export", default=None, help="an export folder (or its llamafactory/); default: a fixture"
    )
    parser.add_argument("--text-only", action="store_true", help="the text-only datasets, a text model")
    parser.add_argument("--version", default=VERSION)
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached venv")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    try:
        result = check(args.export, args.version, args.rebuild, args.keep, text_only=args.text_only)
    except BuildError as exc:
        print(
            f"check_llamafactory: cannot build the LLaMA-Factory {args.version} venv: {exc}", file=sys.stderr
        )
        return 2
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
