"""`clipsearch train`: contrastive training or fine-tuning of a CLIP on captioned images."""

from __future__ import annotations

import json

import click


@click.command("train")
@click.argument("data")
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Run folder (resumes if it holds this run).",
)
@click.option("--val", default=None, help="Held-out set for recall@k, in the same forms as DATA.")
@click.option("--val-fraction", default=0.05, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="Without --val: share of DATA held out (0: no evaluation).")  # fmt: skip
@click.option("--model", "model_name", default=None, help="Architecture to train from scratch [default: tiny-vit].")
@click.option("--from", "init_from", default=None, help="Checkpoint path or model name to fine-tune instead.")
@click.option("--epochs", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(min=2))
@click.option(
    "--lr", default=5e-4, show_default=True, type=click.FloatRange(min=0, min_open=True), help="Peak learning rate."
)
@click.option("--weight-decay", default=0.2, show_default=True, type=click.FloatRange(min=0))
@click.option("--warmup", default=None, type=click.IntRange(min=0), help="Warm-up steps [default: 5% of the run].")
@click.option("--grad-clip", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option(
    "--max-shift",
    default=None,
    type=click.IntRange(min=0),
    help="Random translation in pixels [default: image size / 16].",
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--checkpoint-every", default=100, show_default=True, type=click.IntRange(min=1), help="Steps between checkpoints."
)
@click.option(
    "--log-every", default=50, show_default=True, type=click.IntRange(min=1), help="Steps between metrics lines."
)
@click.option("--device", default="auto", show_default=True, help='"auto", "cpu", "cuda", "cuda:1", ...')
@click.option("--threads", default=None, type=click.IntRange(min=1), help="CPU threads for torch [default: torch's].")
@click.option("--save-dtype", default="float32", show_default=True, type=click.Choice(["float32", "float16"]))
@click.option("--name", default=None, help="Name recorded in the checkpoint [default: the --out folder's name].")
@click.option("--description", default="", help="One line recorded in the checkpoint.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def train(
    data: str,
    out_dir: str,
    val: str | None,
    val_fraction: float,
    model_name: str | None,
    init_from: str | None,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    warmup: int | None,
    grad_clip: float,
    max_shift: int | None,
    seed: int,
    checkpoint_every: int,
    log_every: int,
    device: str,
    threads: int | None,
    save_dtype: str,
    name: str | None,
    description: str,
    as_json: bool,
) -> None:
    """Train a CLIP on captioned images with the contrastive loss, or fine-tune one.

    DATA is a JSONL manifest ({"image": path, "caption": text} per line; paths relative to it), a CSV
    manifest with image and caption columns, a folder with a .txt caption beside each image, or
    shapes:N[:SEED] for N generated shapes scenes rendered in memory (shapes:N:SEED:shape-groups=G,
    :colour-groups=G or :mixed-groups=G: in groups of G scenes that differ only in the object's shape, or
    colour, or either in turn; each group kept in one batch).

    The run folder gets the trained model (config.json + model.safetensors, usable as --model for
    every command), metrics.jsonl (loss, and recall@1/5/10 on the held-out set after each epoch) and
    train_state.pt. A checkpoint is written every --checkpoint-every steps and at each epoch end; after an
    interruption, the same command resumes from the last one and ends as an uninterrupted run would.

    \b
    Examples:
      clipsearch train captions.jsonl --out runs/mine --from ViT-B/32 --epochs 3 --lr 1e-5
      clipsearch train ./photos --out runs/photos --model tiny-vit --val-fraction 0.1
      clipsearch train shapes:60000:1 --val shapes:500:2 --model shapes-mini --out runs/shapes-mini
    """
    import torch

    from retrieval.training.trainer import TrainConfig
    from retrieval.training.trainer import train as run_training

    if model_name is not None and init_from is not None:
        raise click.UsageError("--model (train from scratch) and --from (fine-tune) exclude each other; give one")
    if threads is not None:
        torch.set_num_threads(threads)
    config = TrainConfig(
        data=data, out_dir=out_dir, val=val, val_fraction=val_fraction, model=model_name or "tiny-vit",
        init_from=init_from, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup=warmup,
        grad_clip=grad_clip, max_shift=max_shift, seed=seed, checkpoint_every=checkpoint_every, log_every=log_every,
        device=device, save_dtype=save_dtype, name=name, description=description,
    )  # fmt: skip
    result = run_training(config)
    summary = {
        "out": str(result.out_dir),
        "steps": result.steps,
        "final_loss": result.final_loss,
        "epoch_loss": result.epoch_loss,
        "resumed_from": result.resumed_from,
        "images_per_s": round(result.images_per_second, 1),
    } | result.metrics
    if as_json:
        click.echo(json.dumps(summary))
        return
    if result.resumed_from == result.steps:
        click.echo(f"{result.out_dir} already holds this run, trained for {result.steps} steps; nothing to do")
    elif result.resumed_from is not None:
        click.echo(f"resumed from step {result.resumed_from}")
    recall = "  ".join(f"{k} {v:.3f}" for k, v in result.metrics.items())
    click.echo(f"trained {result.steps} steps, final loss {result.final_loss:.4f}" + (f"  {recall}" if recall else ""))
    click.echo(f"model: {result.out_dir}  (use it with --model {result.out_dir})")
