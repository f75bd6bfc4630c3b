"""One curator round for ``bench_distill.py --vs-curator`` (runs in curator's own venv).

    CURATOR_PYTHON distill_curator_worker.py PROMPTS.json BASE_URL SAMPLES IN_FLIGHT

PROMPTS.json: a list of chat message lists (the same messages the engine sends). Every prompt is
asked SAMPLES times (one row each) with the engine's sampling parameters. Prints one JSON line:
rows returned and wall seconds. The parent times completions by tailing curator's response files.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    prompts_path, base_url, samples, in_flight = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    started = time.perf_counter()
    from bespokelabs import curator
    from datasets import Dataset

    prompts = json.load(open(prompts_path))
    rows = [{"messages": json.dumps(m), "sample_idx": s} for m in prompts for s in range(samples)]

    class Distill(curator.LLM):
        def prompt(self, row):
            return json.loads(row["messages"])

        def parse(self, row, response):
            return {"sample_idx": row["sample_idx"], "response": response}

    llm = Distill(
        model_name="bench",
        backend="openai",
        generation_params={"temperature": 0.6, "top_p": 0.95, "max_tokens": 8192},
        backend_params={
            "base_url": base_url,
            "api_key": "sk-bench-sandbox",
            "max_concurrent_requests": in_flight,
            "max_requests_per_minute": 10_000_000,
            "max_tokens_per_minute": 10_000_000_000,
            "max_retries": 6,
            "require_all_responses": False,
        },
    )
    out = llm(Dataset.from_list(rows))
    dataset = out.dataset if hasattr(out, "dataset") else out
    print(json.dumps({"rows": len(dataset), "wall_s": round(time.perf_counter() - started, 3)}), flush=True)


if __name__ == "__main__":
    main()
