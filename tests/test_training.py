"""Contrastive training: loss, optimiser groups, schedule, data inputs, checkpoints, exact resume, fine-tuning."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from clipsearch.cli import cli
from retrieval import shapes
from retrieval.errors import TrainingError, UnknownModelError
from retrieval.model.checkpoint import save_checkpoint
from retrieval.model.clip import CLIP
from retrieval.model.config import PRESETS, CLIPConfig, TextConfig, VisionConfig
from retrieval.model.loading import load_model
from retrieval.model.preprocess import Preprocess
from retrieval.training import (
    SCRATCH_CONFIGS,
    PairSet,
    ShapesSource,
    TrainConfig,
    WarmupCosine,
    clip_loss,
    evaluate,
    load_pair_set,
    param_groups,
    parse_source,
    read_pairs,
    scratch_config,
    train,
)
from retrieval.training.optim import MAX_LOGIT_SCALE, clamp_logit_scale
from retrieval.training.state import load_state, rng_states, save_state, set_rng_states

TINY = PRESETS["tiny-vit"]


@pytest.fixture
def one_thread():
    """Single-threaded torch (reproducible sums, no oversubscription), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _write_image(path: Path, colour: tuple[int, int, int], size: int = 40) -> Path:
    """A real image file of one colour with a darker square in it."""
    pixels = np.full((size, size, 3), colour, dtype=np.uint8)
    pixels[size // 4 : size // 2, size // 4 : size // 2] //= 2
    Image.fromarray(pixels).save(path)
    return path


def _tiny_run(out: Path, **overrides) -> TrainConfig:
    """A few-second training run of the tiny ViT on generated scenes."""
    settings = dict(data="shapes:96:1", val="shapes:24:2", out_dir=str(out), model="tiny-vit", epochs=2)
    settings |= dict(batch_size=16, lr=1e-3, checkpoint_every=4, log_every=2)
    return TrainConfig(**(settings | overrides))


# --- the objective and the optimiser -------------------------------------------------------------------------


def test_clip_loss_is_the_symmetric_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(6, 6) * 3
    expected = (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6))) / 2
    assert clip_loss(logits, logits.T).item() == pytest.approx(expected.item(), rel=1e-6)
    # Matched pairs scored far above the rest cost almost nothing; shuffled pairs cost about log(B) or more.
    assert clip_loss(torch.eye(6) * 100, torch.eye(6) * 100).item() < 1e-6
    shuffled = torch.eye(6)[torch.randperm(6, generator=torch.Generator().manual_seed(1))] * 100
    assert clip_loss(shuffled, shuffled.T).item() > math.log(6)


def test_param_groups_follow_clip_no_decay_rule():
    model = CLIP(TINY)
    decay, no_decay = param_groups(model, weight_decay=0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decayed | kept == set(names.values()) and not decayed & kept
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.2, 0.0)
    for name in ("logit_scale", "token_embedding.weight", "positional_embedding", "visual.class_embedding",
                 "ln_final.weight", "ln_final.bias", "transformer.resblocks.0.attn.in_proj_bias"):  # fmt: skip
        assert name in kept
    for name in (
        "transformer.resblocks.0.attn.in_proj_weight",
        "visual.conv1.weight",
        "text_projection",
        "visual.proj",
    ):
        assert name in decayed


def test_warmup_then_cosine_schedule():
    schedule = WarmupCosine(warmup=4, total=14)
    factors = [schedule(step) for step in range(15)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factors[4] == pytest.approx(1.0)
    assert factors[9] == pytest.approx(0.5)  # halfway through the cosine
    assert factors[14] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:], strict=False))


def test_logit_scale_is_clamped_at_100():
    model = CLIP(TINY)
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    clamp_logit_scale(model)
    assert model.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-5)
    assert MAX_LOGIT_SCALE == pytest.approx(math.log(100))


def test_named_architectures():
    assert scratch_config("tiny-vit") == TINY
    shapes_mini = scratch_config("shapes-mini")
    assert shapes_mini is SCRATCH_CONFIGS["shapes-mini"] and shapes_mini.vision.image_size == 64
    with pytest.raises(UnknownModelError, match="shapes-mini"):
        scratch_config("no-such-net")


def test_training_state_round_trip_restores_random_streams(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    save_state({"run": {"step": 5}, "rng": rng_states(), "weights": torch.arange(4.0)}, tmp_path)
    expected = (random.random(), np.random.random(), torch.rand(1).item())
    state = load_state(tmp_path)
    assert state["run"] == {"step": 5} and torch.equal(state["weights"], torch.arange(4.0))
    set_rng_states(state["rng"])
    assert (random.random(), np.random.random(), torch.rand(1).item()) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_state.pt"]  # no temporary file left behind

    (tmp_path / "train_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TrainingError, match="delete it"):
        load_state(tmp_path)
    assert load_state(tmp_path / "nothing") is None


# --- inputs ----------------------------------------------------------------------------------------------------


def test_manifests_and_caption_folders(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    red = _write_image(images / "red.png", (220, 30, 30))
    blue = _write_image(images / "blue.jpg", (30, 30, 220))
    _write_image(images / "uncaptioned.png", (30, 220, 30))
    (images / "red.txt").write_text("a red square\n")
    (images / "blue.txt").write_text("a blue square")
    jsonl = tmp_path / "train.jsonl"
    red_line, blue_line = (
        '{"image": "images/red.png", "caption": "a red square"}',
        '{"image": "images/blue.jpg", "caption": "a blue square"}',
    )
    jsonl.write_text(f"{red_line}\n\n{blue_line}\n")  # blank lines are allowed
    csv_file = tmp_path / "train.csv"
    csv_file.write_text('image,caption\nimages/red.png,a red square\nimages/blue.jpg,"a blue square"\n')

    expected = [(blue, "a blue square"), (red, "a red square")]
    assert sorted(read_pairs(jsonl)) == expected
    assert sorted(read_pairs(csv_file)) == expected
    assert sorted(read_pairs(images)) == expected  # the image without a .txt is skipped

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "images/red.png", "caption": "a red square"}\n{"image": "images/blue.jpg"}\n')
    with pytest.raises(TrainingError, match=r"bad.jsonl:2: .*caption"):
        read_pairs(bad)
    with pytest.raises(TrainingError, match="no such manifest or folder"):
        parse_source(tmp_path / "missing.jsonl")
    assert parse_source("shapes:50:3") == ShapesSource(50, 3) and parse_source("shapes:7") == ShapesSource(7, 0)
    assert parse_source("shapes:64:3:shape-groups=8") == ShapesSource(64, 3, group=8, vary="shape")
    assert parse_source("shapes:64:3:colour-groups=4") == ShapesSource(64, 3, group=4, vary="colour")
    assert str(ShapesSource(64, 3, group=4, vary="colour")) == "shapes:64:3:colour-groups=4"
    assert parse_source("shapes:64:3:mixed-groups=8") == ShapesSource(64, 3, group=8, vary="mixed")
    with pytest.raises(TrainingError, match=r"shape-groups must be 1\.\.8"):
        parse_source("shapes:64:3:shape-groups=9")


def test_an_epoch_order_keeps_shape_groups_together():
    n, group = 30, 4  # the last group is incomplete
    pairs = PairSet(torch.zeros(n, 3, 2, 2, dtype=torch.uint8), torch.zeros(n, 3, dtype=torch.long),
                    [str(i) for i in range(n)], Preprocess(2), group)  # fmt: skip
    order = pairs.order(torch.Generator().manual_seed(1)).tolist()
    assert sorted(order) == list(range(n))
    for g in range(-(-n // group)):  # each group's pairs sit next to each other
        places = sorted(order.index(i) for i in range(g * group, min(n, (g + 1) * group)))
        assert places == list(range(places[0], places[0] + len(places))), (g, order)
    assert order != sorted(order)  # groups and pairs within them are shuffled
    # Without groups the order is the plain permutation, so earlier runs resume and reproduce as before.
    plain = dataclasses.replace(pairs, group=1)
    assert torch.equal(
        plain.order(torch.Generator().manual_seed(1)), torch.randperm(n, generator=torch.Generator().manual_seed(1))
    )


def test_shape_group_scenes_load_as_a_grouped_set():
    pairs = load_pair_set(parse_source("shapes:8:5:shape-groups=4"), Preprocess(32), context_length=77, progress=False)
    assert pairs.group == 4 and len(pairs) == 8
    assert pairs.captions[:4] == [shapes.example(5, i, 96, group=4)[1] for i in range(4)]


def test_decoded_set_matches_preprocess_and_skips_bad_files(tmp_path, caplog):
    red = _write_image(tmp_path / "red.png", (220, 30, 30), size=57)
    blue = _write_image(tmp_path / "blue.webp", (30, 30, 220), size=33)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    manifest = tmp_path / "m.jsonl"
    lines = [{"image": "red.png", "caption": "red"}, {"image": "broken.jpg", "caption": "broken"}]
    lines.append({"image": "blue.webp", "caption": "blue"})
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))

    preprocess = Preprocess(32)
    pairs = load_pair_set(manifest, preprocess, context_length=77, progress=False)
    assert pairs.captions == ["red", "blue"]
    assert "broken.jpg" in caplog.text
    pixels, tokens = pairs.batch(torch.tensor([0, 1]))
    assert torch.equal(pixels, torch.stack([preprocess(red), preprocess(blue)]))
    assert tokens.shape == (2, 77)

    shifted, _ = pairs.batch(torch.tensor([0, 1]), max_shift=3, generator=torch.Generator().manual_seed(5))
    again, _ = pairs.batch(torch.tensor([0, 1]), max_shift=3, generator=torch.Generator().manual_seed(5))
    assert shifted.shape == pixels.shape and torch.equal(shifted, again)


# --- runs ------------------------------------------------------------------------------------------------------


def test_training_writes_a_loadable_checkpoint_and_metrics(tmp_path, one_thread):
    result = train(_tiny_run(tmp_path / "run"), progress=False)
    assert result.steps == 2 * (96 // 16) and result.resumed_from is None
    assert math.isfinite(result.final_loss)

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == [1, 2]
    assert {"t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10"} <= set(evals[-1])
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4, 6, 8, 10, 12]

    model, preprocess = load_model(tmp_path / "run", device="cpu")
    assert model.config == TINY and preprocess.image_size == TINY.vision.image_size
    val = load_pair_set(parse_source("shapes:24:2"), preprocess, 77, progress=False)
    assert evaluate(model, val) == pytest.approx(result.metrics)

    # Done runs are not trained again; other settings in the same folder are refused.
    again = train(_tiny_run(tmp_path / "run"), progress=False)
    assert (again.steps, again.resumed_from, again.final_loss) == (result.steps, result.steps, result.final_loss)
    with pytest.raises(TrainingError, match="lr: 0.001 -> 0.002"):
        train(_tiny_run(tmp_path / "run", lr=2e-3), progress=False)
    # A folder holding a checkpoint that is not a run of ours (e.g. the model being fine-tuned) is never overwritten.
    (tmp_path / "run" / "train_state.pt").unlink()
    weights = (tmp_path / "run" / "model.safetensors").read_bytes()
    with pytest.raises(TrainingError, match="choose another --out"):
        train(_tiny_run(tmp_path / "run", init_from=str(tmp_path / "run")), progress=False)
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == weights


_CLI_ARGS = [
    "train", "shapes:120:1", "--val", "shapes:24:2", "--model", "tiny-vit", "--epochs", "2", "--batch-size", "20",
    "--lr", "1e-3", "--checkpoint-every", "4", "--log-every", "1", "--threads", "1", "--json",
]  # fmt: skip
# Runs the CLI; with a step number, SIGKILLs the process right after the checkpoint of that step is written.
_RUNNER = """
import functools, os, signal, sys
import retrieval.training.trainer as trainer
from clipsearch.cli import main

kill_at = int(sys.argv.pop(1))
if kill_at:
    def kill(step):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    trainer.train = functools.partial(trainer.train, on_checkpoint=kill)
sys.argv[0] = "clipsearch"
main()
"""


def _run_cli(tmp_path: Path, out: Path, kill_at: int = 0) -> subprocess.CompletedProcess:
    """`clipsearch train ... --out OUT` in a fresh process (optionally killed after a checkpoint)."""
    script = tmp_path / "runner.py"
    script.write_text(_RUNNER)
    command = [sys.executable, str(script), str(kill_at), *_CLI_ARGS, "--out", str(out)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_a_run_killed_mid_epoch_resumes_to_the_same_result(tmp_path):
    uninterrupted = _run_cli(tmp_path, tmp_path / "a")
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    reference = json.loads(uninterrupted.stdout)
    assert reference["steps"] == 12 and reference["resumed_from"] is None

    killed = _run_cli(tmp_path, tmp_path / "b", kill_at=8)  # epoch 2 of 2, 2 of its 6 steps done
    assert killed.returncode == -9, killed.stderr
    assert not (tmp_path / "b" / "metrics.jsonl").read_text().count('"step": 12')

    resumed = _run_cli(tmp_path, tmp_path / "b")
    assert resumed.returncode == 0, resumed.stderr
    result = json.loads(resumed.stdout)
    assert result["resumed_from"] == 8 and result["steps"] == 12
    assert result["final_loss"] == pytest.approx(reference["final_loss"], rel=1e-5, abs=1e-6)
    assert result["epoch_loss"] == pytest.approx(reference["epoch_loss"], rel=1e-5, abs=1e-6)

    def losses(out: Path) -> list[tuple[int, float]]:
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r.get("loss", r.get("train_loss"))) for r in map(json.loads, lines)]

    assert [s for s, _ in losses(tmp_path / "b")] == [s for s, _ in losses(tmp_path / "a")]  # no line lost or doubled
    assert [v for _, v in losses(tmp_path / "b")] == pytest.approx([v for _, v in losses(tmp_path / "a")], rel=1e-5)


def test_cli_trains_then_reports_a_finished_run(tmp_path, one_thread):
    args = ["train", "shapes:40:1", "--val-fraction", "0", "--model", "tiny-vit", "--epochs", "1", "--batch-size", "20"]
    args += ["--out", str(tmp_path / "run"), "--threads", "1"]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    lines = first.stdout.splitlines()  # progress bars go to stderr
    assert lines[0].startswith("trained 2 steps, final loss ") and lines[1].startswith(f"model: {tmp_path / 'run'}")
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0 and "already holds this run, trained for 2 steps; nothing to do" in again.output
    assert load_model(tmp_path / "run", device="cpu")[0].info.name == "run"


def test_cli_errors_are_one_line():
    runner = CliRunner()
    result = runner.invoke(cli, ["train", "no/such/manifest.jsonl", "--out", "x"])
    assert result.exit_code == 1 and result.output.startswith("Error: no/such/manifest.jsonl: no such manifest")
    result = runner.invoke(cli, ["train", "shapes:10", "--out", "x", "--model", "tiny-vit", "--from", "shapes-mini"])
    assert result.exit_code == 2 and "exclude each other" in result.output


def test_fine_tuning_raises_held_out_recall(tmp_path, one_thread):
    torch.manual_seed(0)
    small_vit = CLIPConfig(32, VisionConfig(32, 64, 1, 1, 8), TextConfig(width=64, heads=1, layers=1))
    base = save_checkpoint(CLIP(small_vit), tmp_path / "base")
    model, preprocess = load_model(base, device="cpu")
    held_out = load_pair_set(parse_source("shapes:100:2"), preprocess, 77, progress=False)
    before = evaluate(model, held_out)

    settings = dict(data="shapes:800:1", val="shapes:100:2", out_dir=str(tmp_path / "tuned"), init_from=str(base))
    settings |= dict(epochs=4, batch_size=32, lr=1e-3, weight_decay=0.1)
    after = train(TrainConfig(**settings), progress=False).metrics
    # Chance is 0.05; the trained model should at least have learnt colours and shapes.
    assert after["t2i_r5"] > before["t2i_r5"] and after["i2t_r5"] > before["i2t_r5"], (before, after)
    assert (after["t2i_r5"] + after["i2t_r5"]) / 2 >= (before["t2i_r5"] + before["i2t_r5"]) / 2 + 0.1, (before, after)
    assert evaluate(model, held_out) == before  # load_model's shared instance was copied, not trained in place
