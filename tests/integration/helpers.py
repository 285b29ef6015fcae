"""Helpers for end-to-end tests that drive nnU-Net's real console commands in subprocesses.

Typical use in a test (fixtures from tests/conftest.py)::

    @pytest.mark.integration
    def test_something(nnunet_dataset):
        result = train(nnunet_dataset, "nnUNetTrainerTopoMAEPretrain_test")   # raises with the log tail on failure
        fold = output_folder(nnunet_dataset.results, nnunet_dataset.dataset_name,
                             "nnUNetTrainerTopoMAEPretrain_test")

Conventions:
  - console scripts are taken from the virtualenv of the running interpreter (``console_script``),
    so the tests work in any venv without activating it;
  - every subprocess gets an environment built by ``NNUNetTestDataset.env()``: no ``nnUNet_*``
    variable of the calling shell leaks in;
  - a test that must not share outputs with others (a second run of the same trainer, a run that is
    expected to fail, ...) trains into its own results root: ``nnunet_dataset.fresh_results("name")``
    and ``env(nnUNet_results=...)``.
  - ``run`` fails a test whose command leaves processes running after it ended (they are killed);
    pass ``check_leftovers=False`` to inspect ``result.leftovers`` yourself.
  - short-schedule trainers for tests live in tests/ext_trainers/nnunet_topomae_test_trainers.py;
    ``INTERRUPT_ENV`` there kills a training right after a given epoch (to test ``--c``).
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# appended to nnUNet_extTrainer: holds the *_test trainers
TEST_EXT_TRAINER_DIR = os.path.join(TESTS_DIR, "ext_trainers")

DATASET_ID = 901
DATASET_NAME = "Dataset901_Synth"
# the trainer module of the shim folder; kept here as strings so the helpers do not import it
INTERRUPT_ENV = "NNUNET_TOPOMAE_TEST_INTERRUPT_AFTER_EPOCH"
INTERRUPT_EXIT_CODE = 75


def console_script(name: str) -> str:
    """Path of a console script (nnUNetv2_train, nnunet-topomae, ...) installed next to the running
    interpreter, i.e. in the same virtualenv."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    if not os.path.isfile(path):
        raise AssertionError(f"console script {name} not found next to {sys.executable}; "
                             f"is the package installed in this environment (pip install -e .)?")
    return path


def _tail(text: Optional[str], n: int) -> str:
    if text is None:
        return ""
    return "\n".join(text.splitlines()[-n:])


RUN_MARKER_ENV = "NNUNET_TOPOMAE_TEST_RUN"


def processes_with_marker(marker: str) -> List[Tuple[int, str]]:
    """(pid, command line) of every live process whose environment holds RUN_MARKER_ENV=marker, i.e.
    the process started by ``run`` and everything it spawned (Linux /proc; [] elsewhere)."""
    found = []
    needle = f"{RUN_MARKER_ENV}={marker}".encode()
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()) if os.path.isdir("/proc") else ():
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # exited meanwhile, or not ours to read
            continue
        if pid != os.getpid():
            found.append((pid, cmdline))
    return found


def _reap_leftovers(marker: str, grace: float) -> List[Tuple[int, str]]:
    """Processes of a finished run still alive after ``grace`` seconds; they are killed (by pid)."""
    deadline = time.time() + grace
    left = processes_with_marker(marker)
    while left and time.time() < deadline:
        time.sleep(0.5)
        left = processes_with_marker(marker)
    for pid, _ in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return left


def run(cmd: Sequence[str], env: Dict[str, str], timeout: float = 600, cwd: Optional[str] = None,
        check: bool = True, tail_lines: int = 60, check_leftovers: bool = True,
        leftover_grace: float = 10.0) -> subprocess.CompletedProcess:
    """Run ``cmd`` (a list) and return the CompletedProcess (text stdout/stderr, plus ``duration``
    in seconds and ``leftovers``: [(pid, cmdline)] of processes it left behind).

    - With ``check`` (default) a non-zero exit code raises AssertionError with the command, the exit
      code and the last ``tail_lines`` lines of stdout and stderr; a timeout always does (and the
      whole process tree of the run is killed).
    - Output goes to temporary files, not pipes, so worker processes that outlive the command
      cannot block the test.
    - Every process of the run carries RUN_MARKER_ENV in its environment; processes still alive
      ``leftover_grace`` s after the command ended are killed and, with ``check_leftovers``
      (default), reported as an AssertionError."""
    cmd = [str(c) for c in cmd]
    marker = uuid.uuid4().hex
    env = dict(env, **{RUN_MARKER_ENV: marker})
    t0 = time.time()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, text=True)
        try:
            returncode = proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            proc.kill()
            returncode = proc.wait()
            timed_out = True
        out.seek(0)
        err.seek(0)
        res = subprocess.CompletedProcess(cmd, returncode, out.read(), err.read())
    res.duration = time.time() - t0
    res.leftovers = _reap_leftovers(marker, 0 if timed_out else leftover_grace)
    if timed_out:
        raise AssertionError(f"timeout after {timeout} s: {shlex.join(cmd)}\n" + describe(res, tail_lines))
    if check and res.returncode != 0:
        raise AssertionError(describe(res, tail_lines))
    if check_leftovers and res.leftovers:
        raise AssertionError(leftover_message(res))
    return res


def leftover_message(res: subprocess.CompletedProcess) -> str:
    procs = "\n".join(f"  pid {pid}: {cmd[:200]}" for pid, cmd in res.leftovers)
    return (f"{shlex.join(res.args)} (exit code {res.returncode}) left {len(res.leftovers)} process(es) "
            f"running after it ended (killed by the test):\n{procs}")


def describe(res: subprocess.CompletedProcess, tail_lines: int = 60) -> str:
    """Command, exit code and output tails of a finished run, for assertion messages."""
    return (f"exit code {res.returncode}: {shlex.join(res.args)}\n"
            f"--- stdout (last {tail_lines} lines) ---\n{_tail(res.stdout, tail_lines)}\n"
            f"--- stderr (last {tail_lines} lines) ---\n{_tail(res.stderr, tail_lines)}")


def clean_base_env() -> Dict[str, str]:
    """os.environ without any nnUNet_* variable (the caller's shell must not leak into the tests;
    note that nnUNet_n_proc_DA=0 would crash nnUNetv2_plan_and_preprocess), headless matplotlib."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env["MPLBACKEND"] = "Agg"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def parse_env_output(stdout: str) -> str:
    """Value of ``export nnUNet_extTrainer=...`` printed by ``nnunet-topomae env``."""
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected exactly one line from 'nnunet-topomae env', got: {stdout!r}"
    words = shlex.split(lines[0])
    assert len(words) == 2 and words[0] == "export" and words[1].startswith("nnUNet_extTrainer="), lines[0]
    return words[1][len("nnUNet_extTrainer="):]


def ext_trainer_from_cli(base_env: Dict[str, str]) -> str:
    """What a user gets from ``eval "$(nnunet-topomae env)"`` in a clean shell."""
    res = run([console_script("nnunet-topomae"), "env"], base_env, timeout=120)
    return parse_env_output(res.stdout)


@dataclass
class NNUNetTestDataset:
    """A planned and preprocessed synthetic nnU-Net dataset in a temporary root (see conftest.py)."""
    root: str
    raw: str
    preprocessed: str
    results: str
    dataset_id: int = DATASET_ID
    dataset_name: str = DATASET_NAME
    ext_trainer: str = ""  # nnUNet_extTrainer for training: `nnunet-topomae env` + the test shim folder
    plan_seconds: float = 0.0
    _fresh: List[str] = field(default_factory=list)

    @property
    def preprocessed_dataset(self) -> str:
        return os.path.join(self.preprocessed, self.dataset_name)

    @property
    def plans_file(self) -> str:
        return os.path.join(self.preprocessed_dataset, "nnUNetPlans.json")

    @property
    def dataset_json_file(self) -> str:
        return os.path.join(self.preprocessed_dataset, "dataset.json")

    def env(self, **extra: Optional[str]) -> Dict[str, str]:
        """Environment for nnUNetv2_train & co.: nnUNet_raw/preprocessed/results of this dataset,
        nnUNet_n_proc_DA=0 (data augmentation in the main process), nnUNet_def_n_proc=1,
        nnUNet_compile=f and nnUNet_extTrainer = our folder (from `nnunet-topomae env`) + the test
        shim folder. Keyword arguments override variables; a value of None removes the variable."""
        env = clean_base_env()
        env.update(nnUNet_raw=self.raw, nnUNet_preprocessed=self.preprocessed, nnUNet_results=self.results,
                   nnUNet_n_proc_DA="0", nnUNet_def_n_proc="1", nnUNet_compile="f",
                   nnUNet_extTrainer=self.ext_trainer)
        for k, v in extra.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = str(v)
        return env

    def fresh_results(self, name: str) -> str:
        """A new, empty nnUNet_results folder for one test (use with env(nnUNet_results=...))."""
        path = os.path.join(self.root, f"results_{name}")
        i = 1
        while os.path.exists(path):
            i += 1
            path = os.path.join(self.root, f"results_{name}_{i}")
        os.makedirs(path)
        return path

    def load_plans(self) -> dict:
        import json
        with open(self.plans_file) as f:
            return json.load(f)

    def load_dataset_json(self) -> dict:
        import json
        with open(self.dataset_json_file) as f:
            return json.load(f)


def prepare_nnunet_dataset(root: str, n_cases: int = 6, shape=(40, 40, 40), configurations=("3d_fullres",),
                           timeout: float = 900) -> NNUNetTestDataset:
    """Write the synthetic dataset (tests/synthetic.py) into ``root``/raw and run
    ``nnUNetv2_plan_and_preprocess -d 901 -c <configurations> -np 1`` (nnU-Net plans every
    configuration, 2d included; only ``configurations`` are preprocessed)."""
    if TESTS_DIR not in sys.path:
        sys.path.insert(0, TESTS_DIR)
    from synthetic import make_dataset

    ds = NNUNetTestDataset(root=root, raw=os.path.join(root, "raw"), preprocessed=os.path.join(root, "preprocessed"),
                           results=os.path.join(root, "results"))
    for d in (ds.raw, ds.preprocessed, ds.results):
        os.makedirs(d, exist_ok=True)
    make_dataset(ds.raw, dataset_id=DATASET_ID, n_cases=n_cases, shape=shape)

    # no nnUNet_n_proc_DA here: nnUNet_n_proc_DA=0 makes plan_and_preprocess crash
    env = clean_base_env()
    env.update(nnUNet_raw=ds.raw, nnUNet_preprocessed=ds.preprocessed, nnUNet_results=ds.results,
               nnUNet_def_n_proc="1", nnUNet_compile="f")
    t0 = time.time()
    run([console_script("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", *configurations,
         "-np", *(["1"] * len(configurations))], env, timeout=timeout)
    ds.plan_seconds = time.time() - t0
    assert os.path.isfile(ds.plans_file), f"plan_and_preprocess did not write {ds.plans_file}"

    ds.ext_trainer = ext_trainer_from_cli(clean_base_env()) + os.pathsep + TEST_EXT_TRAINER_DIR
    return ds


def output_folder(results: str, dataset_name: str, trainer: str, plans: str = "nnUNetPlans",
                  configuration: str = "3d_fullres", fold: int | str = 0) -> str:
    """nnU-Net's output folder of one training run."""
    return os.path.join(results, dataset_name, f"{trainer}__{plans}__{configuration}", f"fold_{fold}")


def train(ds: NNUNetTestDataset, trainer: str, configuration: str = "3d_fullres", fold: int | str = 0,
          extra_args: Sequence[str] = (), env: Optional[Dict[str, str]] = None, timeout: float = 900,
          check: bool = True, check_leftovers: bool = True) -> subprocess.CompletedProcess:
    """``nnUNetv2_train <id> <configuration> <fold> -tr <trainer> -device cpu <extra_args>`` via ``run``."""
    cmd = [console_script("nnUNetv2_train"), str(ds.dataset_id), configuration, str(fold), "-tr", trainer,
           "-device", "cpu", *extra_args]
    return run(cmd, env if env is not None else ds.env(), timeout=timeout, check=check,
               check_leftovers=check_leftovers)


def is_png(path: str, min_bytes: int = 1000) -> bool:
    """A non-trivial PNG file (signature and size)."""
    if not os.path.isfile(path) or os.path.getsize(path) < min_bytes:
        return False
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"
