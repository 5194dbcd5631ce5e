"""`fedame-bench prepare` and the main job's missing-input line: offline, on an empty folder
and on generated fixtures (a CIFAR-100 in torchvision's format, a tiny random CLIP)."""

import json
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from bench.cli import app
from tests.conftest import write_cifar_fixture

runner = CliRunner()


def _paths(root: Path) -> list[str]:
    return [
        "--set",
        f"data.root={root / 'data'}",
        "--set",
        f"backbone.weights={root / 'weights' / 'b50.pt'}",
        "--set",
        f"methods.fedame.anchors.file={root / 'data' / 'anchors' / 'clip.npz'}",
    ]


def write_tiny_clip(folder: Path) -> Path:
    """A randomly initialised CLIP with a character-level tokenizer, saved as from_pretrained reads it."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]  # GPT-2's byte alphabet
    vocab = {t: i for i, t in enumerate([*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"])}
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)
    small = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1)
    cfg = CLIPConfig(
        text_config={**small, "vocab_size": len(vocab), "max_position_embeddings": 77},
        vision_config={**small, "image_size": 32, "patch_size": 16},
        projection_dim=8,
    )
    CLIPModel(cfg).save_pretrained(folder)
    return folder


def test_main_job_without_its_inputs_is_one_line_naming_prepare_and_writes_nothing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    res = runner.invoke(app, ["run", "-c", "cifar100_local", "--methods", "fedame,fedavg", "--out", str(empty / "results"), *_paths(empty)])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    text = " ".join(lines)
    assert text.startswith("error:") and "fedame-bench prepare -c cifar100_local" in text
    for what in ("CIFAR-100", "b50.pt", "clip.npz", "35 min"):
        assert what in text
    assert list(empty.iterdir()) == []


def test_prepare_makes_what_is_missing_checks_what_is_there_and_keeps_going_past_a_failure(tmp_path):
    write_cifar_fixture(tmp_path / "data", "cifar100", per_class_train=4, per_class_test=2)
    clip = write_tiny_clip(tmp_path / "clip")
    args = [
        "prepare",
        "-c",
        "cifar100_local",
        "--methods",
        "fedame",
        *_paths(tmp_path),
        "--set",
        f"methods.fedame.anchors.model={clip}",
        "--set",
        "prepare.backbone.epochs=1",
        "--set",
        "prepare.backbone.batch_size=64",
    ]
    res = runner.invoke(app, args)
    # the fixture is not torchvision's official file: that input fails, the other two are still made
    assert res.exit_code == 2, res.output
    assert "differs from torchvision's official file" in res.output and "1 of 3 inputs not ready" in res.output
    weights, anchors = tmp_path / "weights" / "b50.pt", tmp_path / "data" / "anchors" / "clip.npz"
    assert weights.exists() and json.loads(weights.with_suffix(".json").read_text())["classes"] == list(range(50))
    with np.load(anchors) as z:
        assert z["features"].shape == (100, 8) and np.allclose(np.linalg.norm(z["features"], axis=1), 1, atol=1e-5)
        assert len(z["class_names"]) == 100
    stamps = {p: p.stat().st_mtime_ns for p in (weights, anchors)}

    again = runner.invoke(app, args)  # made ones are skipped, checked against their recorded sha256
    assert "backbone trained on classes 0-49: present (sha256 matches b50.json)" in again.output
    assert "present (sha256 matches)" in again.output and "making" not in again.output
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    anchors.write_bytes(anchors.read_bytes()[:-8])  # a truncated file is found, not used
    broken = runner.invoke(app, args)
    assert broken.exit_code == 2 and "does not match its recorded sha256" in broken.output


def test_prepare_offline_on_an_empty_folder_says_why_each_input_cannot_be_made(tmp_path):
    res = runner.invoke(app, ["prepare", "-c", "cifar100_local", "--methods", "fedame", *_paths(tmp_path)])
    assert res.exit_code == 2
    assert "3 of 3 inputs not ready" in res.output and "no network" in res.output
    assert not (tmp_path / "weights").exists() and not (tmp_path / "data" / "anchors").exists()
