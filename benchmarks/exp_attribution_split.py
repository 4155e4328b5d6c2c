"""Experiment: does an IOI head's logit difference come from promoting the answer or suppressing the subject?

For the heads with the largest ``dla_diff`` on the bundled ``ioi`` set (SmolLM2-135M), splits
the direct contribution into logit(answer) and logit(distractor) separately (mean and 95 %
Student-t interval over the 80 items; docs/metrics.md §11).

    .venv/bin/python benchmarks/exp_attribution_split.py
"""

from __future__ import annotations

import argparse

import torch

from probes.base import mean_and_ci
from workbench.data import load_dataset
from workbench.logit_attribution import answer_token, components, project
from workbench.model import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--heads", default="23.3,29.1,23.0,23.2,23.1,23.7")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    batch = load_dataset("ioi", model)
    answers = torch.tensor([answer_token(model, m["answer"]) for m in batch.meta])
    distractors = torch.tensor([answer_token(model, m["distractor"]) for m in batch.meta])
    on_answer, on_distractor = [], []
    for part, a, d in zip(batch.chunks(16), answers.split(16), distractors.split(16)):
        parts = components(model, part)
        on_answer.append(project(model, parts, a)[0][:, parts.head_index.flatten()])
        on_distractor.append(project(model, parts, d)[0][:, parts.head_index.flatten()])
    on_answer, on_distractor = torch.cat(on_answer), torch.cat(on_distractor)
    print(f"{model.name}, ioi, {len(batch)} items: direct contribution to each logit at the last token")
    print("| head | to logit(answer) [95% CI] | to logit(distractor) [95% CI] | difference |")
    print("|---|---|---|---|")
    for spec in args.heads.split(","):
        layer, head = (int(x) for x in spec.split("."))
        index = layer * model.n_heads + head
        a_mean, a_lo, a_hi = mean_and_ci(on_answer[:, index])
        d_mean, d_lo, d_hi = mean_and_ci(on_distractor[:, index])
        print(f"| L{layer}H{head} | {a_mean:+.3f} [{a_lo:+.3f}, {a_hi:+.3f}] | {d_mean:+.3f} [{d_lo:+.3f}, {d_hi:+.3f}] "
              f"| {a_mean - d_mean:+.3f} |")


if __name__ == "__main__":
    main()
