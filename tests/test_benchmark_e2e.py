"""benchmarks/train_e2e.py on the CPU: the GPU throughput driver of issue 16 sets up a random-weight
model on disk, its pairs and latent cache, and times `diffpo train` from its own metrics.jsonl."""

import json

from benchmarks import train_e2e


def test_e2e_driver_sets_up_and_times_the_trainer(tmp_path):
    work = tmp_path / "work"
    setup = train_e2e.main(["setup", "--arch", "tiny-sdxl", "--pairs", "4", "--work", str(work), "--device", "cpu"])
    assert (work / "cache" / "meta.json").is_file() and setup["pairs"] == 4
    out = tmp_path / "train.json"
    record = train_e2e.main(["train", "--work", str(work), "--name", "a", "--steps", "3", "--skip", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(record))
    assert record["steps"] == 3 and len(record["step_seconds"]) == len(record["data_seconds"]) == 3
    assert record["median_of_steps"] == "2-3" and record["pairs_per_s"] == record["pairs_per_step"] / record["median_step_s"]
    assert all(loss is not None for loss in record["losses"]) and record["skipped"] == 0
    assert set(record["compile_cache_counters"]) == {"inductor", "aot_autograd"}
    assert not (work / "runs" / "a" / "final").exists()  # saves are left out of timed runs
    from diffpo import train as train_module

    assert train_module.save_final.__name__ == "save_final"  # and are back for the rest of the process

    # --profile 2: optimizer steps 2 and 3 under torch.profiler, left out of the median
    profiled = train_e2e.main(["train", "--work", str(work), "--name", "p", "--steps", "5", "--skip", "1", "--profile", "2", "--out", str(tmp_path / "p.json")])
    assert profiled["profile"]["steps"] == [2, 3] and profiled["profile"]["by_kind_ms"] and profiled["profile"]["wall_ms"] > 0
    assert (tmp_path / profiled["profile"]["table"]).is_file()
    # steps 2-3 profiled, step 4 starts on a drained device: only step 5 is timed
    assert profiled["median_of_steps"] == "2-5 without 2-4 (profiled)" and profiled["median_step_s"] == profiled["step_seconds"][4]
    assert train_module.step_record.__name__ == "step_record"


def test_compile_seconds_reads_the_phases_whether_or_not_tabulate_is_installed(monkeypatch):
    """The GPU image has `tabulate`, which turns compile_times(repr="str") into a whitespace table:
    the phases must come from Dynamo's record, not from parsing that string (it gave {} there)."""
    import importlib.machinery
    import sys
    import types

    import torch

    fake = types.ModuleType("tabulate")
    fake.__spec__ = importlib.machinery.ModuleSpec("tabulate", None)
    fake.tabulate = lambda rows, headers: "\n".join(f"{name}    {value}" for name, value in [headers, *rows])
    monkeypatch.setitem(sys.modules, "tabulate", fake)
    torch._dynamo.reset()
    torch.compile(lambda x: torch.relu(x) + 1, backend="eager")(torch.randn(3))
    phases = train_e2e.compile_seconds()
    assert phases and all(isinstance(v, float) and v >= 0 for v in phases.values())
    assert any("compile" in name for name in phases)  # e.g. _compile.compile_inner
    assert list(phases.values()) == sorted(phases.values(), reverse=True)
