"""Every loop resumes exactly after SIGKILL or Ctrl-C at a random epoch, and a finished
run resumed does nothing. Each run has validation, early stopping, a decaying schedule,
KL warm-up and the convergence probe on (see ``_loops_script.py``)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("_loops_script.py")
ROOT = SCRIPT.parents[2]
LOOPS = ("full", "mini", "graph", "sampler")
EPOCHS = 8


def _run(loop: str, out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), "--loop", loop, "--epochs", str(EPOCHS),
                           "--out", str(out), *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=600, preexec_fn=_default_sigint)


def _default_sigint() -> None:
    # A suite started in the background of a non-interactive shell inherits SIGINT as
    # ignored; the child must see Ctrl-C as a user's run does.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _load(path: Path) -> dict:
    with open(path) as fh:
        return json.load(fh)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run of each loop (with checkpoints, so it can be resumed)."""
    cache: dict[str, tuple[dict, Path]] = {}

    def get(loop: str) -> tuple[dict, Path]:
        if loop not in cache:
            where = tmp_path_factory.mktemp(f"ref_{loop}")
            proc = _run(loop, where / "ref.json", "--ckpt", where / "ref.pt")
            assert proc.returncode == 0, proc.stderr[-3000:]
            cache[loop] = (_load(where / "ref.json"), where / "ref.pt")
        return cache[loop]

    return get


def _assert_same_run(ref: dict, other: dict, context: str) -> None:
    assert other["weights"] == ref["weights"], f"weights differ ({context})"
    assert other["history"] == ref["history"], f"history differs ({context})"
    assert other["steps"] == ref["steps"], f"step validations differ ({context})"
    assert other["probe"] == ref["probe"], f"probe ARIs differ ({context})"


def _epochs_saved(ckpt: Path) -> int:
    return torch.load(ckpt, weights_only=True)["counters"]["epoch"]


@pytest.mark.parametrize("sig", ["KILL", "INT"])
@pytest.mark.parametrize("loop", LOOPS)
def test_interrupted_run_resumes_bit_for_bit(loop, sig, tmp_path, reference):
    ref, _ = reference(loop)
    assert len(ref["history"]) == EPOCHS and ref["probe"] and not ref["stopped"]
    kill_epoch = random.Random().randrange(1, EPOCHS - 1)
    context = f"{loop}, SIG{sig} in epoch {kill_epoch}"
    ckpt = tmp_path / "run.pt"
    killed = _run(loop, tmp_path / "never.json", "--ckpt", ckpt, "--kill-epoch", kill_epoch,
                  "--kill-signal", sig)
    assert killed.returncode == (-9 if sig == "KILL" else 130), (context, killed.stderr[-2000:])
    assert not (tmp_path / "never.json").exists()
    # the mid-epoch state is never saved: the checkpoint holds the last completed epoch
    assert _epochs_saved(ckpt) == kill_epoch, context
    if sig == "INT":
        assert f"the state after {kill_epoch} completed epochs was saved" in killed.stdout
    resumed = _run(loop, tmp_path / "res.json", "--ckpt", ckpt, "--resume", ckpt)
    assert resumed.returncode == 0, (context, resumed.stderr[-2000:])
    _assert_same_run(ref, _load(tmp_path / "res.json"), context)


def test_twice_interrupted_run_resumes_bit_for_bit(tmp_path, reference):
    ref, _ = reference("mini")
    first, second = sorted(random.Random().sample(range(1, EPOCHS - 1), 2))
    ckpt = tmp_path / "run.pt"
    a = _run("mini", tmp_path / "x.json", "--ckpt", ckpt, "--kill-epoch", first,
             "--kill-signal", "INT")
    assert a.returncode == 130, a.stderr[-2000:]
    b = _run("mini", tmp_path / "x.json", "--ckpt", ckpt, "--resume", ckpt, "--kill-epoch",
             second, "--kill-signal", "TERM")
    assert b.returncode == 143, b.stderr[-2000:]
    assert _epochs_saved(ckpt) == second
    c = _run("mini", tmp_path / "res.json", "--ckpt", ckpt, "--resume", ckpt)
    assert c.returncode == 0, c.stderr[-2000:]
    _assert_same_run(ref, _load(tmp_path / "res.json"), f"Ctrl-C in {first}, SIGTERM in {second}")


@pytest.mark.parametrize("loop", LOOPS)
def test_resuming_a_finished_run_does_nothing(loop, tmp_path, reference):
    ref, ref_ckpt = reference(loop)
    before = ref_ckpt.read_bytes()
    again = _run(loop, tmp_path / "again.json", "--resume", ref_ckpt)
    assert again.returncode == 0, again.stderr[-2000:]
    out = _load(tmp_path / "again.json")
    _assert_same_run(ref, out, f"{loop} resumed after it finished")
    assert any("had already finished" in m and "nothing to do" in m for m in out["messages"])
    assert ref_ckpt.read_bytes() == before
