"""Which learning rate a short refine can use: fine-tune the float (BatchNorm-folded) model itself.

A refine that damages the uncompressed model is too hot for any compressed one. For each rate,
the folded float model is fine-tuned as bench/alds.py refines (the zoo recipe's optimiser and batch
size, cosine decay to 0 over the epochs) and its training loss per epoch and held-out metrics are
recorded. Writes bench/results/<model>-refine-rate.{json,md}.

    nice python bench/refine_rate.py --model mnist-resnet20 --rates 2e-3,1e-3,3e-4,2e-4
"""

from __future__ import annotations

import argparse
import copy
import dataclasses

import torch
from common import RESULTS, command, environment

from allot.api import prepare
from allot.evaluate import metrics
from allot.files import atomic_write, write_json
from allot.refine.train import TrainSettings, train
from allot.zoo import create_model, get_dataset, get_entry
from allot.zoo.data import SplitBatches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--rates", required=True, help="comma-separated learning rates")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = get_entry(args.model).recipe
    dataset = get_dataset(get_entry(args.model).dataset, seed=args.seed)
    data = dataclasses.replace(
        dataset.to_data(),
        train=SplitBatches(dataset.train, recipe.batch_size, shuffle=args.seed),
    )
    work, folded, _, _ = prepare(create_model(args.model))
    head = dataset.task.headline
    rows = [{"lr": None, "training_loss": None, **metrics(work, data)}]
    for rate in (float(r) for r in args.rates.split(",")):
        model = copy.deepcopy(work)
        settings = TrainSettings(epochs=args.epochs, lr=rate, optimizer=recipe.optimizer)
        losses = train(model, data, settings, progress=False)
        rows.append({"lr": rate, "training_loss": losses, **metrics(model, data)})
        print(f"lr {rate:g}: training loss {losses}, {head} {rows[-1][head]:.4f}", flush=True)
    results = {
        **environment(args.model, dataset, args.seed),
        "command": command(),
        "folded_batchnorm": len(folded),
        "recipe": dataclasses.asdict(recipe),
        "epochs": args.epochs,
        "rows": rows,
    }
    stem = f"{args.model}-refine-rate"
    write_json(RESULTS / f"{stem}.json", results)
    lines = [
        f"# Refine rate: {args.model}, float model fine-tuned",
        "",
        f"Command: `{results['command']}`  ",
        f"Code: {results['code']}  ",
        f"The BatchNorm-folded float model ({len(folded)} BatchNorm layers folded) fine-tuned "
        f"{args.epochs} epochs per rate: {recipe.optimizer}, batches of {recipe.batch_size} (the "
        f"recipe's; its rate is {recipe.lr:g}), cosine decay to 0. Training loss is the mean "
        "over each epoch.",
        "",
        f"| learning rate | training loss per epoch | {head} | test loss |",
        "|---|---|---|---|",
    ]
    for row in rows:
        rate = "float, not fine-tuned" if row["lr"] is None else f"{row['lr']:g}"
        losses = (
            ""
            if row["training_loss"] is None
            else ", ".join(f"{v:.4f}" for v in row["training_loss"])
        )
        lines.append(f"| {rate} | {losses} | {row[head]:.4f} | {row.get('loss', 0):.4f} |")
    atomic_write(RESULTS / f"{stem}.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
