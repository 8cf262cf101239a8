"""Where a CPU training run should preprocess its pairs: Ray Data tasks or inline.

``otmel train --preprocess tasks`` streams each worker's share of every global batch through
a Ray Data pipeline of its own (CPU tasks: tokenise, decode and CLIP-process images), which
keeps a GPU fed; ``inline`` preprocesses in the worker's own process. This runs the same
2-worker training both ways, side by side in one run, on a local Ray instance (2 CPUs), and
reports seconds per epoch, the whole run, and that the two end with the same weights.

    .venv/bin/python bench/train_preprocess.py [--sizes tiny base] [--repeats 2]

``base`` is the ViT-B/32 architecture with random weights, saved as a CLIP directory and
loaded as ``--clip`` (the towers are fine-tuned, as a real run does; a few steps only).
Writes bench/results/train_preprocess.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from sizes import new_model  # noqa: E402

#: per size: dataset, batch and epochs (base: ~4 s per 16-pair step on 2 cores)
PLAN = {
    "tiny": {"entities": 60, "mentions": 400, "batch": 16, "epochs": 3, "text_length": 24},
    "base": {"entities": 16, "mentions": 64, "batch": 8, "epochs": 2, "text_length": 40},
}


def base_clip_dir(root: Path) -> str:
    """The random ViT-B/32 CLIP as a directory ``--clip`` loads (weights, tokenizer, processor)."""
    model, pre = new_model("base")
    out = root / "clip-base"
    model.encoder.clip.save_pretrained(str(out))
    pre.save_pretrained(out)
    return str(out)


def run_once(size: str, data: Path, out: Path, preprocess: str, clip: str | None) -> dict:
    from otmel.jobs.train import TrainConfig, run
    from safetensors.torch import load_file

    plan = PLAN[size]
    cfg = TrainConfig(data=str(data), out=str(out), mode="kd", workers=2, epochs=plan["epochs"],
                      batch_size=plan["batch"], lr=1e-3 if size == "tiny" else 2e-5, tiny_clip=clip is None,
                      clip=clip, name=f"{size}-{preprocess}", eval_every=0, max_failures=0,
                      model={"text_length": plan["text_length"]}, preprocess=preprocess)
    t0 = time.perf_counter()
    result = run(cfg)
    seconds = time.perf_counter() - t0
    epochs = [json.loads(x)["epoch_seconds"] for x in open(f"{result.run_uri}/metrics.jsonl")]
    return {"seconds": seconds, "epoch_seconds": epochs,
            "weights": load_file(f"{result.latest_checkpoint}/model.safetensors")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", choices=sorted(PLAN), default=["tiny", "base"])
    ap.add_argument("--repeats", type=int, default=2, help="pairs (tasks, inline), alternating order")
    ap.add_argument("--out", default=str(HERE / "results" / "train_preprocess.md"))
    args = ap.parse_args()

    import ray
    import torch

    from otmel.data.synth import write_synthetic_dataset

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for size in args.sizes:
            plan = PLAN[size]
            data = root / f"data-{size}"
            write_synthetic_dataset(data, n_entities=plan["entities"], n_mentions=plan["mentions"], seed=0)
            clip = base_clip_dir(root) if size == "base" else None
            results = {"tasks": [], "inline": []}
            for r in range(args.repeats):
                order = ("tasks", "inline") if r % 2 == 0 else ("inline", "tasks")
                for how in order:
                    res = run_once(size, data, root / f"runs-{size}-{r}", how, clip)
                    results[how].append(res)
                    print(f"[{size}] {how}: {res['seconds']:.1f} s, epochs {[round(e, 1) for e in res['epoch_seconds']]}",
                          flush=True)
            a, b = results["tasks"][0]["weights"], results["inline"][0]["weights"]
            diff = max(float((a[k] - b[k]).abs().max()) for k in a if "self_attn.k_proj.bias" not in k)
            rows.append((size, plan, results, diff))
            del a, b
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
    ray.shutdown()

    def med(xs):
        return statistics.median(xs)

    lines = [
        "# Training on CPU: preprocessing in Ray Data tasks vs inline in the workers",
        "",
        f"`.venv/bin/python bench/train_preprocess.py --sizes {' '.join(args.sizes)} --repeats {args.repeats}` "
        f"on {os.uname().machine}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}. 2 Ray Train workers "
        "(0.5 CPU each) on a local Ray instance of 2 CPUs, synth data, dev evaluation off; pairs run back to back "
        "in alternating order, medians shown. Epoch seconds are the workers' own (data wait included); "
        "the run's seconds include Ray Train's start (~20 s here).",
        "",
        "| size | pairs x epochs, batch | tasks: s / epoch | inline: s / epoch | tasks / inline | tasks: run s | "
        "inline: run s | max weight diff after the run |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for size, plan, results, diff in rows:
        t = med([med(r["epoch_seconds"]) for r in results["tasks"]])
        i = med([med(r["epoch_seconds"]) for r in results["inline"]])
        lines.append(f"| {size} | {plan['mentions']} mentions x {plan['epochs']}, {plan['batch']} | {t:.2f} | {i:.2f} | "
                     f"{t / i:.2f} | {med([r['seconds'] for r in results['tasks']]):.1f} | "
                     f"{med([r['seconds'] for r in results['inline']]):.1f} | {diff:.1e} |")
    lines += [
        "",
        "Both ways train on the same batches in the same order (the data-order check runs at every step), so the "
        "weights agree to rounding (the attention key biases, whose exact gradient is 0, are left out as in "
        "tests/test_train_job.py). On CPU the tasks run on the workers' own cores and the Ray Data executor runs "
        "inside each worker: `--preprocess auto` is inline there, tasks with `--gpu` (a GPU must not wait for the "
        "CPU work of its batches).",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
