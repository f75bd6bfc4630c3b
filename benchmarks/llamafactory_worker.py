"""Runs inside LLaMA-Factory's own venv (started by ``benchmarks/check_llamafactory.py``; it does not
import this project): LLaMA-Factory's ``get_dataset`` over every exported row, then SFT steps.

``python llamafactory_worker.py DATASET_DIR MODEL_DIR OUT_DIR [vision|text]`` prints one JSON line of
results. ``vision`` (default): the ``octomed_*`` datasets, a tiny Qwen2.5-VL, the ``qwen2_vl``
template, one step. ``text``: the text-only ``octomed_text_*`` datasets, a tiny text-only Qwen2, the
``qwen`` template, two steps. On CPU: torchaudio is stubbed (mm_plugin imports it; the registry's
build is a CUDA one) and the VL processor is the Qwen2.5-VL one with the PIL image processor (the
torchvision one can't run here).
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import sys
import time
import types


def _stub_torchaudio() -> None:
    if "torchaudio" not in sys.modules:
        mod = types.ModuleType("torchaudio")
        mod.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
        sys.modules["torchaudio"] = mod


def _pil_processor(model_dir: str):
    from transformers import AutoTokenizer, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class Processor(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, name, arg):
            if name == "video_processor" and arg is None:
                return None
            return super().check_argument_for_proper_class(name, arg)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    processor = Processor(
        image_processor=Qwen2VLImageProcessorPil.from_pretrained(model_dir),
        tokenizer=tokenizer,
        video_processor=None,
        chat_template=tokenizer.chat_template,
    )
    # LLaMA-Factory's qwen2_vl plugin insists on a video processor even for image-only data; the
    # image processor stands in (no video is ever passed).
    processor.video_processor = processor.image_processor
    return processor


# mode -> (dataset prefix, template, SFT steps)
MODES = {"vision": ("octomed_", "qwen2_vl", 1), "text": ("octomed_text_", "qwen", 2)}


def main(dataset_dir: str, model_dir: str, out_dir: str, mode: str = "vision") -> dict:
    prefix, template_name, steps = MODES[mode]
    _stub_torchaudio()
    os.environ.setdefault("DISABLE_VERSION_CHECK", "1")
    import llamafactory.model.loader as loader

    class _AutoProcessor:  # what LLaMA-Factory's load_tokenizer calls
        @staticmethod
        def from_pretrained(path, **_kw):
            return _pil_processor(path)

    if mode == "vision":
        loader.AutoProcessor = _AutoProcessor
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.train.tuner import run_exp

    args = {
        "stage": "sft",
        "do_train": True,
        "model_name_or_path": model_dir,
        "dataset_dir": dataset_dir,
        "dataset": f"{prefix}train",
        "eval_dataset": f"{prefix}validation",
        "template": template_name,
        "finetuning_type": "full",
        "cutoff_len": 8192,
        "output_dir": out_dir,
        "overwrite_output_dir": True,
        "per_device_train_batch_size": 4,
        "max_steps": steps,
        "learning_rate": 1e-4,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "use_cpu": True,
        "bf16": False,
        "preprocessing_num_workers": None,
        "trust_remote_code": False,
    }
    t0 = time.time()
    model_args, data_args, training_args, _, _ = get_train_args(dict(args))
    tokenizer_module = loader.load_tokenizer(model_args)
    tokenizer = tokenizer_module["tokenizer"]
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    module = get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)
    vision_start = tokenizer.convert_tokens_to_ids("<|vision_start|>")
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    report: dict = {"mode": mode, "get_dataset_s": round(time.time() - t0, 1), "splits": {}}
    for name, ds in (("train", module["train_dataset"]), ("validation", module["eval_dataset"])):
        if isinstance(ds, dict):  # several eval datasets come back by name
            ds = next(iter(ds.values()))
        stats = {"rows": len(ds), "image_rows": 0, "images": 0, "bad": []}
        for i, row in enumerate(ds):
            images = row.get("images") or []
            ids = row["input_ids"]
            learned = [t for t, label in zip(ids, row["labels"], strict=True) if label != -100]
            labels_text = tokenizer.decode(learned, skip_special_tokens=False)
            prompt_text = tokenizer.decode(ids, skip_special_tokens=False)
            problems = []
            if mode == "text":  # a text-only model: no image, no placeholder anywhere
                if images:
                    problems.append(f"{len(images)} images in a text-only row")
                if "<image>" in prompt_text or "<|vision_start|>" in prompt_text:
                    problems.append("an image placeholder in a text-only row")
            else:
                if ids.count(vision_start) != len(images):
                    problems.append(f"{ids.count(vision_start)} image blocks for {len(images)} images")
                if images and ids.count(image_pad) == 0:
                    problems.append("no image tokens")
                if image_pad in learned:
                    problems.append("image tokens in labels")
            if not labels_text.startswith("<think>") or "</think>" not in labels_text:
                problems.append("no <think>...</think> in labels")
            if "Final answer: \\boxed{" not in labels_text:
                problems.append("no final answer line in labels")
            if not prompt_text.startswith("<|im_start|>system\nYou are a medical expert."):
                problems.append("system turn not used")
            for path in images:
                if not os.path.isfile(path):
                    problems.append(f"image not found: {path}")
            if problems:
                stats["bad"].append({"row": i, "problems": problems})
            stats["image_rows"] += bool(images)
            stats["images"] += len(images)
        report["splits"][name] = stats
    t1 = time.time()
    run_exp(dict(args))
    report["train_step_s"] = round(time.time() - t1, 1)
    state = os.path.join(out_dir, "trainer_state.json")
    if os.path.isfile(state):
        with open(state) as fh:
            history = json.load(fh).get("log_history", [])
        report["train_loss"] = next((h.get("train_loss") for h in history if "train_loss" in h), None)
        report["global_step"] = max((h.get("step", 0) for h in history), default=0)
    return report


if __name__ == "__main__":
    result = main(*sys.argv[1:5])
    print("OCTOMED_RESULT " + json.dumps(result))
