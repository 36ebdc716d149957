"""gpt4roi_sft.export: what an export leaves on disk, and that nothing already there is lost."""

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_module
from gpt4roi_sft.train import checkpoint as ckpt

ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}


def write_checkpoint(out_dir: Path, model_dir: str, step: int, *overrides: str) -> Path:
    """A complete training checkpoint as the loop writes it (config, gathered trainable weights, client state),
    built without DeepSpeed: the tiny model's own weights, nudged so the export differs from the base."""
    from safetensors.torch import save_file

    from gpt4roi_sft.config import load_config
    from gpt4roi_sft.train.modes import apply_training_mode, load_model_from_config

    cfg = load_config(str(REPO / "configs" / "quickstart.yaml"), [f"model.path={model_dir}", f"train.output_dir={out_dir}",
                                                                   *overrides])
    model, _ = load_model_from_config(cfg, torch.float32)
    model = apply_training_mode(model, cfg)
    state = {n: p.detach().clone() + 0.01 * step for n, p in model.named_parameters() if p.requires_grad}
    step_dir = ckpt.checkpoints_root(out_dir) / ckpt.step_tag(step)
    step_dir.mkdir(parents=True)
    save_file(state, str(step_dir / ckpt.TRAINABLE_FILE))
    cfg.save(step_dir / "config.yaml")
    ckpt.write_client_state(step_dir, {"step": step, "consumed_micro_batches": step, "world_size": 1, "total_steps": step})
    ckpt.mark_complete_and_publish(ckpt.checkpoints_root(out_dir), step_dir, 2)
    return Path(out_dir)


@pytest.fixture(scope="module")
def checkpoint(tiny_model_dir, tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("run"), tiny_model_dir, 7)


def export(checkpoint, out, *extra, umask=None, process=False):
    """``python -m gpt4roi_sft.export``, run in this process unless ``process`` (the first test below starts it)."""
    previous = os.umask(umask) if umask is not None else None
    try:
        return run_module("gpt4roi_sft.export", "--checkpoint", str(checkpoint), "--out", str(out), *extra,
                          process=process, env=ENV, timeout=300)
    finally:
        if previous is not None:
            os.umask(previous)


def test_export_onto_a_model_directory_is_refused_in_one_line_and_the_directory_is_untouched(checkpoint, tiny_model_dir, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(tiny_model_dir, target)
    before = sorted(p.name for p in target.iterdir())
    proc = export(checkpoint, target, process=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: --out {target}: not empty (it holds files this export did not write); pass --overwrite to replace it, "
        f"or choose another folder"]
    assert sorted(p.name for p in target.iterdir()) == before


def test_a_truncated_trainable_file_is_named_and_the_output_dir_exports_the_previous_checkpoint(tiny_model_dir, tmp_path):
    run = write_checkpoint(write_checkpoint(tmp_path / "run", tiny_model_dir, 3), tiny_model_dir, 7)
    broken = ckpt.checkpoints_root(run) / "step_7" / ckpt.TRAINABLE_FILE
    os.truncate(broken, broken.stat().st_size // 2)
    proc = export(broken.parent, tmp_path / "out")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {broken}: truncated ({broken.stat().st_size} bytes, its header describes "
        f"{2 * broken.stat().st_size}); this checkpoint cannot be loaded"]
    assert export(run, tmp_path / "out").returncode == 0
    assert json.loads((tmp_path / "out" / "export_info.json").read_text())["step"] == 3


def test_overwrite_moves_a_directory_the_export_did_not_write_aside_and_deletes_nothing(checkpoint, tiny_model_dir, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(tiny_model_dir, target)
    (target / "notes.txt").write_text("mine")
    proc = export(checkpoint, target, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("model.replaced-")]
    assert len(aside) == 1
    assert (aside[0] / "notes.txt").read_text() == "mine" and (aside[0] / "model.safetensors").is_file()
    assert json.loads((target / "export_info.json").read_text())["step"] == 7


def test_overwrite_replaces_an_earlier_export_in_place(checkpoint, tiny_model_dir, tmp_path):
    lora = write_checkpoint(tmp_path / "lora_run", tiny_model_dir, 3, "lora.enabled=true", "lora.r=4")
    target = tmp_path / "export"
    assert export(lora, target).returncode == 0
    assert (target / "adapter_config.json").is_file()
    proc = export(checkpoint, target, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("export")] == ["export"]
    assert not (target / "adapter_config.json").exists(), "files of the earlier export are replaced, not mixed in"
    info = json.loads((target / "export_info.json").read_text())
    assert info["step"] == 7 and info["kind"] == "full model"
    assert sorted(info["files"]) == sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())


def test_an_export_with_a_file_added_since_is_moved_aside_not_replaced(checkpoint, tmp_path):
    target = tmp_path / "export"
    assert export(checkpoint, target).returncode == 0
    (target / "eval_notes.md").write_text("added by hand")
    assert export(checkpoint, target, "--overwrite").returncode == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("export.replaced-")]
    assert len(aside) == 1 and (aside[0] / "eval_notes.md").read_text() == "added by hand"


def test_exported_folder_is_0755_and_its_files_0644_under_umask_022(checkpoint, tmp_path):
    target = tmp_path / "export"
    proc = export(checkpoint, target, umask=0o022)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    modes = {p.relative_to(target).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in target.rglob("*")}
    assert {"model.safetensors", "config.json", "export_info.json"} <= set(modes)
    assert {name: m for name, m in modes.items() if m != (0o755 if (target / name).is_dir() else 0o644)} == {}


def test_re_exporting_the_same_checkpoint_keeps_the_weights_fingerprint(checkpoint, tmp_path):
    from gpt4roi_sft.provenance import weights_fingerprint

    assert export(checkpoint, tmp_path / "a").returncode == 0
    assert export(checkpoint, tmp_path / "a", "--overwrite").returncode == 0
    first = weights_fingerprint(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    assert weights_fingerprint(tmp_path / "copy") == first
    other = write_checkpoint(tmp_path / "run9", json.loads((tmp_path / "a" / "export_info.json").read_text())["base_model"], 9)
    assert export(other, tmp_path / "b").returncode == 0
    assert weights_fingerprint(tmp_path / "b") != first
