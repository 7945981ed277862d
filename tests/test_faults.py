"""Fault injection: SIGKILLs during saves and pruning, NaN gradients behind a finite loss, a full or
read-only disk, foreign runs in the output folder, resumes with a changed run identity.

Every test asserts on what is left on disk: complete checkpoints hold finite weights, a resumed run
ends with weights equal (bit for bit) to an uninterrupted run's, a refused run changed nothing.
The README's "What diffpo guarantees" names the test behind each of its lines.

Kills: a killed run is a forked child whose audit hook (``sys.addaudithook``) sends itself SIGKILL
at the k-th file operation (open, mkdir, rename, remove, rmdir, rmtree) of a checkpoint save,
pruning included; k is drawn per seed. The whole module runs torch on one thread: a forked child
must not enter the parent's OpenMP pool, and the killed and resumed parts must compute exactly
like the uninterrupted run.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import sys
import traceback
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, tiny_run_config as make_cfg, write_shape_pairs
from safetensors.torch import load_file

from diffpo import cli
from diffpo import losses as losses_module
from diffpo import runs as runs_module
from diffpo import train as train_module
from diffpo.checkpoint import CheckpointError, checkpoint_problem, list_checkpoints, resolve_resume, save_checkpoint
from diffpo.runs import RunFolderError
from diffpo.train import TrainingError, train

# A 4-step run that saves after every step and keeps two checkpoints: every save after the second
# one prunes. 8 pairs, batch 2: an epoch is 4 steps.
RUN = dict(train={"max_steps": 4, "checkpoint_every": 1, "checkpoints_total_limit": 2})
FS_EVENTS = {"open", "os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree"}
_AUDIT = {"armed": False, "count": 0, "kill_at": None, "log": None}


def _audit(event: str, args: tuple) -> None:
    if not _AUDIT["armed"] or event not in FS_EVENTS:
        return
    _AUDIT["count"] += 1
    if _AUDIT["log"] is not None:
        _AUDIT["log"].append((event, str(args[0]) if args else ""))
    if _AUDIT["count"] == _AUDIT["kill_at"]:
        os.kill(os.getpid(), signal.SIGKILL)


if not getattr(sys, "_diffpo_fault_audit", False):  # audit hooks cannot be removed: one per process
    sys.addaudithook(_audit)
    sys._diffpo_fault_audit = True


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory):
    return write_shape_pairs(tmp_path_factory.mktemp("pairs"), 8)


@pytest.fixture
def armed_saves(monkeypatch):
    """Count (and kill at) file operations inside every checkpoint save of the trainer."""

    def armed(*args, **kwargs):
        _AUDIT["armed"] = True
        try:
            return save_checkpoint(*args, **kwargs)
        finally:
            _AUDIT["armed"] = False

    monkeypatch.setattr(train_module, "save_checkpoint", armed)
    _AUDIT.update(count=0, kill_at=None, log=None)
    yield _AUDIT
    _AUDIT.update(armed=False, count=0, kill_at=None, log=None)


def in_killed_child(fn) -> int:
    """Run ``fn`` in a forked child; the signal that ended it (0 if it returned)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            torch.set_num_threads(1)
            fn()
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return os.WTERMSIG(status)
    assert os.WEXITSTATUS(status) == 0, "the child failed before it was killed (see its traceback above)"
    return 0


def weights(folder: Path) -> dict[str, torch.Tensor]:
    file = folder / "model.safetensors" if (folder / "model.safetensors").is_file() else folder / "pytorch_lora_weights.safetensors"
    return load_file(file)


def assert_equal_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), f"{a} and {b} differ at {key}"


def assert_finite(folder: Path) -> None:
    for key, tensor in weights(folder).items():
        assert torch.isfinite(tensor).all(), f"{folder}: {key} is not finite"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, pair_dir, model_cache):
    """The uninterrupted run, with the file operations of its saves recorded."""
    out = tmp_path_factory.mktemp("faults") / "reference"
    mp = pytest.MonkeyPatch()
    log = []

    def recording(*args, **kwargs):
        log.append(("save", str(args[2])))  # (accelerator, output_dir, step, ...)
        _AUDIT.update(armed=True, log=log, count=0, kill_at=None)
        try:
            return save_checkpoint(*args, **kwargs)
        finally:
            _AUDIT.update(armed=False, log=None)

    mp.setattr(train_module, "save_checkpoint", recording)
    try:
        train(make_cfg(out, pair_dir, **RUN), cache_dir=model_cache)
    finally:
        mp.undo()
    return out, log


# ---------------------------------------------------------------------------------------------
# SIGKILL during a save, pruning included
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", ["first-save", 0, 1, 2])
def test_sigkill_during_a_save_then_resume_equals_the_uninterrupted_run(seed, tmp_path, pair_dir, model_cache, reference, armed_saves):
    ref_dir, ref_log = reference
    # The file operations of the four saves, in order (saves 3 and 4 prune). Seeded kills land on
    # one of saves 2-4; "first-save" kills the first save halfway (nothing to resume: start over).
    saves = [i for i, (event, _) in enumerate(ref_log) if event == "save"]
    total = len(ref_log) - len(saves)
    first_save_ops = saves[1] - 1
    assert len(saves) == 4 and total > 2 * first_save_ops
    kill_at = first_save_ops // 2 if seed == "first-save" else random.Random(seed).randint(first_save_ops + 1, total)
    out = tmp_path / "killed"
    armed_saves["kill_at"] = kill_at
    sig = in_killed_child(lambda: train(make_cfg(out, pair_dir, **RUN), cache_dir=model_cache))
    armed_saves["kill_at"] = None
    assert sig == signal.SIGKILL, f"operation {kill_at} of {total} was never reached"

    # What the kill left: complete checkpoints only are listed, each with finite weights.
    complete = list_checkpoints(out)
    assert bool(complete) == (seed != "first-save")
    for checkpoint in complete:
        assert checkpoint_problem(checkpoint) is None
        assert_finite(checkpoint)
    assert not (out / "final").exists()

    train(make_cfg(out, pair_dir, **{"train": {**RUN["train"], "resume": "latest"}}), cache_dir=model_cache)
    assert_equal_weights(out / "final", ref_dir / "final")
    assert_equal_weights(out / "checkpoint-4", ref_dir / "checkpoint-4")
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3", "checkpoint-4"]
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4]


class _FakeAccelerator:
    """Just what save_checkpoint uses; save_state writes four files whose bytes depend on the step."""

    is_main_process = True

    def __init__(self, step: int):
        self.step = step

    def wait_for_everyone(self):
        pass

    def save_state(self, output_dir):
        for name in ("model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
            Path(output_dir, name).write_bytes(f"{name} of step {self.step}".encode() * 50)


def test_sigkill_at_every_operation_of_a_pruning_save_leaves_only_whole_checkpoints(tmp_path):
    """Saving checkpoint-3 with keep=2 writes it and prunes checkpoint-1; a kill at any of its file
    operations leaves each listed checkpoint whole (every file, every byte) and checkpoint-2 listed."""

    def fresh(folder: Path) -> None:
        folder.mkdir()
        for step in (1, 2):
            save_checkpoint(_FakeAccelerator(step), folder, step, {"step": step}, keep=2)

    def whole(checkpoint: Path) -> bool:
        step = int(checkpoint.name.split("-")[1])
        names = ("model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl")
        return all((checkpoint / n).is_file() and (checkpoint / n).read_bytes() == f"{n} of step {step}".encode() * 50 for n in names)

    def save_three(folder: Path) -> None:
        _AUDIT["armed"] = True
        save_checkpoint(_FakeAccelerator(3), folder, 3, {"step": 3}, keep=2)

    # count the operations of one such save
    probe = tmp_path / "probe"
    fresh(probe)
    _AUDIT.update(count=0, kill_at=None, log=[])
    try:
        save_three(probe)
    finally:
        _AUDIT.update(armed=False)
    operations = _AUDIT["count"]
    assert [p.name for p in list_checkpoints(probe)] == ["checkpoint-2", "checkpoint-3"]
    assert any(event == "os.remove" for event, _ in _AUDIT["log"])  # the pruning deleted files

    for kill_at in range(1, operations + 1):
        folder = tmp_path / f"kill{kill_at}"
        fresh(folder)
        _AUDIT.update(count=0, kill_at=kill_at, log=None)
        try:
            assert in_killed_child(lambda: save_three(folder)) == signal.SIGKILL
        finally:
            _AUDIT.update(armed=False, kill_at=None)
        listed = list_checkpoints(folder)
        names = [p.name for p in listed]
        assert "checkpoint-2" in names, (kill_at, names)
        assert all(whole(p) for p in listed), (kill_at, names)
        # nothing half-deleted still carries a checkpoint's name
        for child in folder.iterdir():
            if child.name.startswith("checkpoint-"):
                assert whole(child), (kill_at, child.name, sorted(c.name for c in child.iterdir()))


# ---------------------------------------------------------------------------------------------
# Non-finite values: never applied, never saved
# ---------------------------------------------------------------------------------------------


class _NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_nan_gradients_behind_a_finite_loss_are_never_applied_or_saved(tmp_path, pair_dir, model_cache, monkeypatch):
    """Gradient accumulation 2; from step 3 on, the first micro-step of every step has NaN
    gradients and a finite loss. Steps 3 and 4 are skipped (no checkpoint), the run stops naming
    checkpoint-2, which holds the weights of a clean 2-step run; no final/."""
    spec = losses_module.LOSSES["mapo"]
    calls = {"n": 0}

    def poisoned(err_w, err_l, **hp):
        calls["n"] += 1
        if calls["n"] > 4 and calls["n"] % 2 == 1:  # micro-steps 5, 7, ...: first of steps 3, 4, ...
            err_w = _NaNGradient.apply(err_w)
        return spec.fn(err_w, err_l, **hp)

    monkeypatch.setitem(losses_module.LOSSES, "mapo", type(spec)(spec.name, poisoned, spec.needs_reference, spec.hparams))
    common = {"checkpoint_every": 1, "checkpoints_total_limit": 2, "gradient_accumulation_steps": 2, "max_nonfinite_in_row": 2}
    out = tmp_path / "nan"
    with pytest.raises(TrainingError, match=r"2 optimizer steps in a row .*stopped at step 4.*last complete \(finite\) checkpoint is .*checkpoint-2"):
        train(make_cfg(out, pair_dir, train={**common, "max_steps": 6}), cache_dir=model_cache)
    metrics = read_metrics(out)
    assert [m["skipped"] for m in metrics] == [False, False, True, True]
    assert [m.get("skip_reason") for m in metrics[2:]] == ["gradients", "gradients"]
    assert all(m["loss"] is not None for m in metrics)  # the loss was finite throughout
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    assert not (out / "final").exists()

    monkeypatch.setitem(losses_module.LOSSES, "mapo", spec)
    clean = tmp_path / "clean"
    train(make_cfg(clean, pair_dir, train={**common, "max_steps": 2}), cache_dir=model_cache)
    assert_equal_weights(out / "checkpoint-2", clean / "checkpoint-2")
    assert_finite(out / "checkpoint-2")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 loss scaling (GradScaler) needs a GPU")
def test_fp16_overflows_are_left_to_the_scaler_until_its_scale_is_below_one(tmp_path, pair_dir, model_cache, monkeypatch):
    """NaN gradients from step 3 on under fp16: the GradScaler skips each step and halves its scale
    (65536 -> 1 in 16 steps); only once the scale is below 1 do the skips count towards
    max_nonfinite_in_row. Nothing is applied or saved meanwhile."""
    spec = losses_module.LOSSES["mapo"]
    calls = {"n": 0}

    def poisoned(err_w, err_l, **hp):
        calls["n"] += 1
        return spec.fn(_NaNGradient.apply(err_w) if calls["n"] > 2 else err_w, err_l, **hp)

    monkeypatch.setitem(losses_module.LOSSES, "mapo", type(spec)(spec.name, poisoned, spec.needs_reference, spec.hparams))
    out = tmp_path / "fp16"
    cfg = make_cfg(out, pair_dir, train={"max_steps": 30, "checkpoint_every": 1, "checkpoints_total_limit": 2, "mixed_precision": "fp16", "max_nonfinite_in_row": 2})
    with pytest.raises(TrainingError, match=r"stopped at step 20.*checkpoint-2"):
        train(cfg, cache_dir=model_cache)
    reasons = [m.get("skip_reason") for m in read_metrics(out)]
    assert reasons == [None, None] + ["fp16 overflow"] * 16 + ["gradients"] * 2
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    assert_finite(out / "checkpoint-2")
    assert not (out / "final").exists()


def test_the_issue_repro_lr_1e6_exits_nonzero_without_nan_weights(tmp_path, pair_dir, model_cache, monkeypatch, capsys):
    """`train.learning_rate=1e6 train.lr_warmup_steps=1e6` on tiny:sd with LoRA used to exit 0 with
    an all-NaN final/. Now: exit code 2, one line, no final/, every kept checkpoint finite."""
    monkeypatch.setattr(train_module, "load_components", _cached_loader(model_cache))
    out = tmp_path / "blowup"
    code = cli.main([
        "train", f"output_dir={out}", "seed=0", "model.pretrained=tiny:sd", "model.lora.rank=4", f"data.source={pair_dir}",
        "train.batch_size=2", "train.max_steps=12", "train.checkpoint_every=2", "train.learning_rate=1e6", "train.lr_warmup_steps=1000000",
        "train.max_nonfinite_in_row=2", "logging.report_to=none", "logging.progress=false",
    ])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("diffpo train: error: ") and "Traceback" not in "\n".join(err)
    assert "finite" in err[-1]
    assert not (out / "final").exists()
    for checkpoint in list_checkpoints(out):
        assert_finite(checkpoint)


def _cached_loader(model_cache):
    original = train_module.load_components

    def load(model_cfg, cache_dir=None, **kw):
        return original(model_cfg, cache_dir=model_cache, **kw)

    return load


# ---------------------------------------------------------------------------------------------
# Full or read-only disk
# ---------------------------------------------------------------------------------------------


def test_disk_full_during_a_save_is_one_line_and_keeps_the_last_checkpoint(tmp_path, pair_dir, model_cache, monkeypatch, capsys):
    """The writer raises ENOSPC on the save of checkpoint-2: exit 2, one line naming checkpoint-1,
    no temporary folder left, checkpoint-1 complete and resumable."""
    import accelerate.checkpointing

    monkeypatch.setattr(train_module, "load_components", _cached_loader(model_cache))
    original = accelerate.checkpointing.save
    calls = {"n": 0}

    def save(obj, f, *args, **kwargs):
        if str(f).find(".checkpoint-2.tmp") >= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(accelerate.checkpointing, "save", save)
    out = tmp_path / "full"
    args = ["train", f"output_dir={out}", "seed=3", "model.pretrained=tiny:sd", "model.lora.rank=4", f"data.source={pair_dir}",
            "train.batch_size=2", "train.max_steps=3", "train.checkpoint_every=1", "logging.report_to=none", "logging.progress=false"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"diffpo train: error: could not write checkpoint-2 in {out}: No space left on device; the last complete (finite) checkpoint is {out / 'checkpoint-1'}"
    assert not (out / ".checkpoint-2.tmp").exists()
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1"]
    assert_finite(out / "checkpoint-1")


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC])
def test_read_only_or_full_output_folder_stops_before_the_model_loads(code, tmp_path, pair_dir, monkeypatch, capsys):
    def never(*a, **k):
        raise AssertionError("the model was loaded")

    def refusing_open(path, mode="r", *args, **kwargs):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(train_module, "load_components", never)
    monkeypatch.setattr(runs_module, "open", refusing_open, raising=False)
    out = tmp_path / "ro"
    args = ["train", f"output_dir={out}", "model.pretrained=tiny:sd", f"data.source={pair_dir}", "train.batch_size=2", "logging.report_to=none"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"diffpo train: error: output_dir {out} is not writable: {os.strerror(code)}"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_real_read_only_folder_is_refused(tmp_path, pair_dir, capsys):  # pragma: no cover - non-root CI
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert cli.main(["train", f"output_dir={out}", f"data.source={pair_dir}", "train.batch_size=2", "logging.report_to=none"]) == 2
    finally:
        out.chmod(0o755)
    assert "is not writable" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Foreign runs in the output folder
# ---------------------------------------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_fresh_run_into_a_folder_holding_another_run_is_refused_and_changes_nothing(tmp_path, pair_dir, reference):
    out = tmp_path / "other"
    shutil.copytree(reference[0], out)
    before = _snapshot(out)
    with pytest.raises(RunFolderError, match=r"holds another run \(checkpoint-3/, checkpoint-4/, config.yaml, final/ and 1 more\).*overwrite_output_dir=true"):
        train(make_cfg(out, pair_dir, loss={"name": "dmpo"}))
    assert _snapshot(out) == before


def test_overwrite_moves_the_other_run_aside_and_latest_then_continues_the_new_one(tmp_path, pair_dir, model_cache, reference):
    out = tmp_path / "other"
    shutil.copytree(reference[0], out)
    before = _snapshot(out)
    train(make_cfg(out, pair_dir, overwrite_output_dir=True, loss={"name": "sft"}, train={"max_steps": 1, "checkpoint_every": 1}), cache_dir=model_cache)
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("other.old-")]
    assert len(moved) == 1 and _snapshot(moved[0]) == before  # never deleted: moved, byte for byte
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1"]
    assert [m["step"] for m in read_metrics(out)] == [1]
    latest = resolve_resume("latest", out)  # what resume=latest continues: the new run, not the moved one
    assert latest == out / "checkpoint-1"
    assert json.loads((latest / "trainer_state.json").read_text())["identity"]["loss.name"] == "sft"


def test_incomplete_foreign_checkpoints_are_ignored_by_latest_and_named_when_asked_for(tmp_path, pair_dir, reference):
    out = tmp_path / "partial"
    shutil.copytree(reference[0], out)
    (out / "checkpoint-4" / "model.safetensors").unlink()  # e.g. a prune killed by an older diffpo
    shutil.copytree(out / "checkpoint-3", out / "checkpoint-9")
    (out / "checkpoint-9" / "complete.json").unlink(missing_ok=True)  # a foreign folder without the marker
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3"]
    with pytest.raises(CheckpointError, match=r"checkpoint-4 is not a complete checkpoint: model.safetensors is missing"):
        train(make_cfg(out, pair_dir, train={"resume": str(out / "checkpoint-4")}))
    with pytest.raises(CheckpointError, match=r"checkpoint-9 is not a complete checkpoint: no complete.json"):
        train(make_cfg(out, pair_dir, train={"resume": str(out / "checkpoint-9")}))


def test_resuming_an_earlier_checkpoint_moves_the_later_ones_aside(tmp_path, pair_dir, model_cache, reference):
    """Resume checkpoint-3 of a finished 4-step run, with another max_steps: checkpoint-4 and final/
    (an abandoned continuation) move to superseded-*/, so resume=latest and pruning never pick them."""
    out = tmp_path / "again"
    shutil.copytree(reference[0], out)
    old_four = _snapshot(out / "checkpoint-4")
    train(make_cfg(out, pair_dir, train={**RUN["train"], "max_steps": 5, "resume": str(out / "checkpoint-3")}), cache_dir=model_cache)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4", "checkpoint-5"]
    aside = [p for p in out.iterdir() if p.name.startswith("superseded-")]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["checkpoint-4", "final"]
    assert _snapshot(aside[0] / "checkpoint-4") == old_four
    # the recomputed step 4 equals the uninterrupted run's step 4 (same run, resumed exactly)
    assert_equal_weights(out / "checkpoint-4", reference[0] / "checkpoint-4")


# ---------------------------------------------------------------------------------------------
# Resume with a changed run identity
# ---------------------------------------------------------------------------------------------

CHANGES = [
    ({"loss": {"name": "dmpo"}}, "loss.name was 'mapo' there, 'dmpo' in this run"),
    ({"loss": {"beta": 0.5}}, "loss.beta was 0.1 there, 0.5 in this run"),
    ({"seed": 4}, "seed was 3 there, 4 in this run"),
    ({"train": {"learning_rate": 1e-4}}, "train.learning_rate was 0.001 there, 0.0001 in this run"),
    ({"train": {"lr_scheduler": "cosine"}}, "train.lr_scheduler was 'constant_with_warmup' there, 'cosine' in this run"),
    ({"train": {"lr_warmup_steps": 3}}, "train.lr_warmup_steps was 0 there, 3 in this run"),
    ({"train": {"batch_size": 4}}, "train.global_batch was 2 there, 4 in this run"),
    ({"train": {"gradient_accumulation_steps": 2}}, "train.gradient_accumulation_steps was 1 there, 2 in this run"),
    ({"model": {"lora": {"enabled": True, "rank": 8}}}, "model.lora.rank was 4 there, 8 in this run"),
    ({"model": {"lora": {"enabled": False}}}, "model.lora.enabled was True there, False in this run"),
    ({"data": {"resolution": 64}}, "data.resolution was 32 there, 64 in this run"),
    ({"data": {"max_pairs": 6}}, "data.fingerprint was '8 pairs, sha256 [0-9a-f]+' there, '6 pairs, sha256 [0-9a-f]+' in this run"),
    ({"model": {"pretrained": "tiny:sd2v"}}, "model.pretrained was 'tiny:sd' there, 'tiny:sd2v' in this run"),
]


@pytest.mark.parametrize("change,message", CHANGES, ids=[m.split(" was")[0] for _, m in CHANGES])
def test_resume_with_a_changed_identity_key_is_refused_before_the_model_loads(change, message, tmp_path, pair_dir, reference, monkeypatch):
    monkeypatch.setattr(train_module, "load_components", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    before = _snapshot(out)
    sections = {k: v for k, v in change.items() if k not in ("train", "data")}
    cfg = make_cfg(out, pair_dir, **sections, train={**RUN["train"], **change.get("train", {}), "max_steps": 6, "resume": "latest"})
    for key, value in change.get("data", {}).items():
        setattr(cfg.data, key, value)
    with pytest.raises(RunFolderError, match=rf"cannot resume .*checkpoint-4: {message}"):
        train(cfg)
    assert _snapshot(out) == before


def test_resume_with_another_data_source_is_refused(tmp_path, pair_dir, reference):
    (tmp_path / "pairs2").mkdir()
    other = write_shape_pairs(tmp_path / "pairs2", 8)
    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    with pytest.raises(RunFolderError, match=rf"data.source was '{pair_dir.resolve()}' there, '{other.resolve()}' in this run"):
        train(make_cfg(out, other, train={**RUN["train"], "resume": "latest"}))


def test_allowed_changes_apply_and_safe_keys_need_no_permission(tmp_path, pair_dir, model_cache, reference):
    """train.resume_allow_changes=[train.learning_rate]: the new rate is the one used (it used to
    stay the old one); max_steps, checkpointing and logging change freely."""
    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    cfg = make_cfg(out, pair_dir, logging={"log_every": 1, "report_to": "none", "progress": False},
                   train={"max_steps": 6, "checkpoint_every": 3, "checkpoints_total_limit": 5, "learning_rate": 2e-4,
                          "resume": "latest", "resume_allow_changes": ["train.learning_rate"]})
    train(cfg, cache_dir=model_cache)
    metrics = read_metrics(out)
    assert [m["lr"] for m in metrics] == [1e-3] * 4 + [2e-4] * 2
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["identity"]["train.learning_rate"] == 2e-4


@pytest.mark.parametrize("model,allow", [
    ({"lora": {"enabled": True, "rank": 8}}, "model.lora.rank"),
    ({"lora": {"enabled": False}}, "model.lora.enabled"),
])
def test_resume_shape_mismatch_is_one_line_exit_2(model, allow, tmp_path, pair_dir, model_cache, reference, monkeypatch, capsys):
    """Even when the changed key is allowed, weights that do not fit are one line, exit code 2."""
    monkeypatch.setattr(train_module, "load_components", _cached_loader(model_cache))
    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    lora = model["lora"]
    args = ["train", f"output_dir={out}", "seed=3", "model.pretrained=tiny:sd", f"data.source={pair_dir}", "train.batch_size=2",
            "train.learning_rate=1e-3", "train.max_steps=6", "train.resume=latest", f"train.resume_allow_changes=[{allow}]",
            f"model.lora.enabled={str(lora['enabled']).lower()}", *([f"model.lora.rank={lora['rank']}"] if "rank" in lora else []),
            "logging.report_to=none", "logging.progress=false"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"diffpo train: error: cannot resume {out / 'checkpoint-4'}: its saved state does not fit this run's model or optimizer (")
    assert not any("Traceback" in line for line in err)


def test_unknown_allowed_key_is_a_config_error():
    from diffpo.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="'train.batch_size' is not a key of the run identity"):
        config_from_dict({"train": {"resume_allow_changes": ["train.batch_size"]}})
