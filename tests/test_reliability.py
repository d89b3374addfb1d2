"""When things go wrong: mistakes of input, divergence, preemption, unreadable checkpoints, locks.

The table drives `tljax.main.run` (the command line, in this process) with one bad input
each and requires exit status 2, exactly one line `Error: ...` naming the offending value,
no traceback, and the workdir as it was (absent, or a finished run's files untouched).
Device counts and process exits need their own processes; those cases run as subprocesses.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from tests.test_train import TINY
from tljax import checkpoint, main, tree
from tljax import workdir as workdir_lib
from tljax.errors import InputError
from tljax.workdir import RunDir

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "--config=configs/vit_finetune.py:runlocal"
# The tiny ViT of test_train, finished after 4 steps with checkpoints 2 and 4.
FINISHED = {**TINY, "total_steps": 4, "warmup_steps": 1, "log_every_steps": 2,
            "eval_every_steps": 2, "checkpoint_every_steps": 2}


def _flags(overrides: dict) -> list[str]:
    return [f"--config.{k}={v}" for k, v in overrides.items()]


def _snapshot(path: Path) -> dict | None:
    """Every file under `path` with its size, modification time and content hash."""
    if not path.exists():
        return None
    if path.is_file():
        return {"": hashlib.sha1(path.read_bytes()).hexdigest()}
    out = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = file.stat()
        out[str(file.relative_to(path))] = (stat.st_size, stat.st_mtime_ns,
                                            hashlib.sha1(file.read_bytes()).hexdigest())
    return out


def _run_cli(argv: list[str], capfd) -> tuple[int, str, str]:
    capfd.readouterr()
    status = main.run(argv)
    out, err = capfd.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def finished(tmp_path_factory, fashion_mnist_dir) -> Path:
    workdir = tmp_path_factory.mktemp("finished") / "run"
    jax.devices()  # the backend's own start-up notes land here, not in a case's output
    os.chdir(ROOT)
    assert main.run([CONFIG, f"--workdir={workdir}", *_flags(FINISHED)]) == 0
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
    return workdir


def _image(path: Path, size: tuple[int, int] = (28, 28), seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size, np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory) -> Path:
    """Folder datasets and text files with one mistake each."""
    root = tmp_path_factory.mktemp("bad_data")
    for name in ("empty", "testonly", "corrupt", "truncated", "sizes"):
        for i, split_class in enumerate(("train/a", "train/b", "test/a")):
            _image(root / name / split_class / f"{i}.png", seed=i)
    (root / "empty/train/c").mkdir()
    (root / "empty/train/c/notes.txt").write_text("not an image")
    _image(root / "testonly/test/zebra/z.png")
    (root / "corrupt/train/b/bad.png").write_bytes(np.random.default_rng(1).bytes(500))
    good = (root / "truncated/train/a/0.png").read_bytes()
    (root / "truncated/train/b/cut.png").write_bytes(good[:len(good) // 2])
    _image(root / "sizes/train/b/big.png", size=(32, 32))
    (root / "ragged.csv").write_text("text,label\nhello there,a\nArsenal beat Chelsea, 2-0,b\n")
    (root / "bad.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b", "label"\n')
    (root / "nolabel.csv").write_text("text,category\nhi,a\n")
    for i, suffix in enumerate((".safetensors", ".pth", ".npz")):  # not pickles: noise
        (root / f"random{suffix}").write_bytes(np.random.default_rng(i).bytes(1000))
    (root / "a_file").write_text("a workdir cannot be a file")
    return root


# (id, arguments after the base command, what the message must name, workdir).
# "{data}" is the bad_data folder; the workdir is "new" (must stay absent), "finished" (its
# files must stay untouched) or "file" (a file given as --workdir).
CASES = [
    # Command line and config syntax.
    ("unknown key", ["--config.no_such_key=1"], "no_such_key", "new"),
    ("nested key typo", ["--config.input.batchsize=8"], "closest valid key: batch_size", "new"),
    ("bool given maybe", ["--config.cache_features=maybe"], "'maybe'", "new"),
    ("int given text", ["--config.total_steps=ten"], "'ten'", "new"),
    ("float given text", ["--config.lr=fast"], "'fast'", "new"),
    ("list field not a list", ["--config.mesh=data"], "'data'", "new"),
    ("override without value", ["--config.lr"], "--config.lr", "new"),
    ("unknown flag", ["--workdirr=/tmp/x"], "--workdirr", "new"),
    ("config file missing", ["--config=configs/vit_finetun.py"], "vit_finetun.py", "new"),
    ("config argument unknown", ["--config=configs/vit_finetune.py:datset=x"], "'datset'",
     "new"),
    ("config argument bool maybe", ["--config=configs/vit_finetune.py:runlocal=maybe"],
     "'maybe'", "new"),
    ("config argument value unknown", ["--config=configs/vit_finetune.py:dataset=cifar11"],
     "'cifar11'", "new"),
    # Values out of range.
    ("negative lr", ["--config.lr=-0.1"], "lr=-0.1", "new"),
    ("keep no checkpoint", ["--config.keep_checkpoints=0"], "keep_checkpoints=0", "new"),
    ("batch size zero", ["--config.input.batch_size=0"], "batch_size=0", "new"),
    ("eval batch negative", ["--config.eval.batch_size=-8"], "batch_size=-8", "new"),
    ("total steps zero", ["--config.total_steps=0"], "total_steps=0", "new"),
    ("warmup negative", ["--config.warmup_steps=-1"], "warmup_steps=-1", "new"),
    ("conflicting durations", ["--config.total_epochs=3"], "total_epochs", "new"),
    ("adam b2 above 1", ["--config.optim.b2=1.5"], "b2=1.5", "new"),
    ("llrd above 1", ["--config.llrd=2.0"], "llrd=2.0", "new"),
    ("on_nonfinite unknown", ["--config.on_nonfinite=ignore"], "'ignore'", "new"),
    ("on_bad_example unknown", ["--config.input.on_bad_example=drop"], "'drop'", "new"),
    # Names.
    ("compute dtype typo", ["--config.compute_dtype=flaot32"], "value: float32", "new"),
    ("model family typo", ["--config.model_name=vitt"], "'vitt'", "new"),
    ("model variant unknown", ["--config=configs/vit_finetune.py:model=X/99"], "X/99", "new"),
    ("task unknown", ["--config.task.name=clasification"], "'clasification'", "new"),
    ("task option typo", ["--config.task.los=x"], "closest valid key: loss", "new"),
    ("mesh needs more devices", ["--config.mesh=[('data', 3)]"], "('data', 3)", "new"),
    ("sharding kind unknown", ["--config.sharding_rules=[('.*', 'shard')]"], "'shard'", "new"),
    ("lr_mults regex broken", ["--config.lr_mults=[('(', 2.0)]"], "'('", "new"),
    ("freeze preset typo", ["--config.freeze=linear_prob"], "'linear_prob'", "new"),
    ("freeze trains nothing", ["--config.freeze=none_but('^nothing/')"], "^nothing/", "new"),
    ("freeze k too large", ["--config.freeze=last_k_blocks(99)"], "last_k_blocks(99)", "new"),
    ("init source typo", ["--config.init.source=vit_jaxx"], "'vit_jaxx'", "new"),
    ("init path missing", ["--config.init.source=vit_jax", "--config.init.path=/no/ckpt.npz"],
     "/no/ckpt.npz", "new"),
    ("init file random bytes", ["--config.init.source=timm",
                                "--config.init.path={data}/random.safetensors"],
     "random.safetensors", "new"),
    ("init .pth random bytes", ["--config.init.source=torchvision", "--config.init.arch=resnet18",
                                "--config.init.path={data}/random.pth"],
     "random.pth is not a readable PyTorch checkpoint", "new"),
    ("init .npz random bytes", ["--config.init.source=big_vision",
                                "--config.init.path={data}/random.npz"],
     "random.npz is not an .npz archive", "new"),
    # Splits and pp, train and eval (the eval pipeline is read before any training).
    ("split malformed", ["--config.input.split=train[:50"], "'train[:50'", "new"),
    ("slice not a number", ["--config.eval.split=test[a:b]"], "'test[a:b]'", "new"),
    ("eval split unknown", ["--config.eval.split=validation"], "'validation'", "new"),
    ("train pp op unknown", ["--config.input.pp=decode|resise(32)"], "'resise'", "new"),
    ("eval pp syntax", ["--config.eval.pp=decode|resize(32"], "resize(32", "new"),
    ("eval pp op unknown", ["--config.eval.pp=decode|rgbb"], "'rgbb'", "new"),
    ("eval pp drops the label", ["--config.eval.pp=decode|rgb|value_range(-1,1)|drop('label')"],
     "'label'", "new"),
    ("eval pp wrong size", ["--config.eval.pp=decode|resize(56)|rgb|value_range(-1,1)"],
     "56, 56", "new"),
    # Data.
    ("dataset name typo", ["--config.input.dataset=fashoin_mnist"], "'fashion_mnist'", "new"),
    ("dataset not prepared", ["--config.input.dataset=mnist"], "'mnist' is not prepared",
     "new"),
    ("dataset prefix typo", ["--config.input.dataset=foldr:/tmp/x"], "'foldr:'", "new"),
    ("folder missing", ["--config.input.dataset=folder:/no/such/folder"], "/no/such/folder",
     "new"),
    ("empty class folder", ["--config.input.dataset=folder:{data}/empty"], "empty/train/c",
     "new"),
    ("class only in test", ["--config.input.dataset=folder:{data}/testonly"], "zebra", "new"),
    ("corrupt image", ["--config.input.dataset=folder:{data}/corrupt"], "bad.png", "new"),
    ("truncated image", ["--config.input.dataset=folder:{data}/truncated"], "cut.png", "new"),
    ("images of two sizes", ["--config.input.dataset=folder:{data}/sizes"], "big.png", "new"),
    ("csv row with 3 fields", ["--config.input.dataset=textfile:{data}/ragged.csv"],
     "ragged.csv, line 3", "new"),
    ("jsonl line broken", ["--config.input.dataset=textfile:{data}/bad.jsonl"],
     "bad.jsonl, line 2", "new"),
    ("csv file missing", ["--config.input.dataset=textfile:{data}/nothere.csv"], "nothere.csv",
     "new"),
    # (a text-only file is a causal-LM dataset; a classification run says it has no label)
    ("csv without label column", ["--config.input.dataset=textfile:{data}/nolabel.csv"],
     "nolabel.csv", "new"),
    # Workdirs and processes.
    ("workdir is a file", [], "a_file", "file"),
    ("workdir not writable", ["--workdir=/sys/tljax_workdir"], "/sys/tljax_workdir", "new"),
    ("resume with another width", ["--config.model.width=64"], "model.width 32 -> 64",
     "finished"),
    ("resume with another batch", ["--config.input.batch_size=16"],
     "input.batch_size 32 -> 16", "finished"),
    ("processes without coordinator", ["--num_processes=2", "--process_id=0"],
     "--num_processes and --process_id", "new"),
    ("coordinator without port", ["--coordinator_address=localhost", "--num_processes=2",
                                  "--process_id=0"], "'localhost'", "new"),
    ("process id out of range", ["--coordinator_address=127.0.0.1:1", "--num_processes=2",
                                 "--process_id=2"], "--process_id=2", "new"),
]


@pytest.mark.parametrize("name, args, expected, where", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_before_any_work(name, args, expected, where, tmp_path, capfd,
                                               finished, bad_data, monkeypatch):
    monkeypatch.chdir(ROOT)
    workdir = {"new": tmp_path / "new", "finished": finished,
               "file": bad_data / "a_file"}[where]
    args = [a.replace("{data}", str(bad_data)) for a in args]
    config = next((a for a in args if a.startswith("--config=")), CONFIG)
    overrides = FINISHED if where == "finished" else TINY if config == CONFIG else {}
    argv = [config, f"--workdir={workdir}", *_flags(overrides),
            *(a for a in args if not a.startswith("--config="))]
    if any(a.startswith("--workdir=/sys") for a in args):
        workdir = Path("/sys/tljax_workdir")
        argv = [a for a in argv if a != f"--workdir={tmp_path / 'new'}"]
    before = _snapshot(workdir)
    status, out, err = _run_cli(argv, capfd)
    lines = err.strip().splitlines()
    assert status == 2, (status, out[-2000:], err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("Error: "), err[-3000:]
    assert expected in lines[0], lines[0]
    assert "Traceback" not in out + err
    assert _snapshot(workdir) == before, "the workdir changed"


def test_the_table_covers_forty_bad_inputs():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


def _cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tljax.main", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})


@pytest.mark.parametrize("key, value", [("input.batch_size", 33), ("eval.batch_size", 127)])
def test_batch_sizes_must_split_over_the_devices(key, value, tmp_path, fashion_mnist_dir):
    result = _cli(CONFIG, f"--workdir={tmp_path}/w", *_flags({**TINY, key: value}),
                  env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert result.returncode == 2, result.stderr[-3000:]
    line, = result.stderr.strip().splitlines()
    assert f"config.{key}={value} does not split over 2 devices" in line
    assert "use a multiple of 2, e.g. " in line and not os.path.exists(tmp_path / "w")


def test_unreachable_coordinator_fails_in_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens there once the socket is closed
    start = time.time()
    result = _cli(CONFIG, f"--workdir={tmp_path}/w", f"--coordinator_address=127.0.0.1:{port}",
                  "--num_processes=2", "--process_id=1", "--distributed_timeout=3")
    assert result.returncode == 2, result.stderr[-3000:]
    line, = result.stderr.strip().splitlines()
    assert f"could not join the run at --coordinator_address=127.0.0.1:{port} within 3 s" in line
    assert time.time() - start < 60 and not os.path.exists(tmp_path / "w")


def test_verbose_shows_the_traceback(tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(InputError, match="keep_checkpoints=0"):
        main.run([CONFIG, f"--workdir={tmp_path}/w", "--config.keep_checkpoints=0",
                  "--verbose"])


# ---------------------------------------------------------------------------------------------
# The plan, list-valued fields, init.arch.


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capfd, monkeypatch,
                                                    fashion_mnist_dir):
    monkeypatch.chdir(ROOT)
    workdir = tmp_path / "w"
    status, out, err = _run_cli(
        [CONFIG, f"--workdir={workdir}", *_flags(TINY), "--dry_run",
         "--config.schedule=[('^head/', {}), ('.*', None)]", "--config.mesh=[('data', -1)]"],
        capfd)
    assert status == 0, err[-3000:]
    assert "train[:2000]': 2,000 examples; eval 'test[:512]': 512 examples in 4 batches" in out
    assert "steps     40 of 32 (0.64 epochs)" in out
    assert "'schedule' from step 0: 330 trainable parameters" in out  # the head: 32 x 10 + 10
    assert f"{workdir}: a new run" in out
    assert not workdir.exists()


@pytest.mark.parametrize("config", ["vit_finetune.py", "vit_finetune.py:runlocal",
                                    "quickstart.py", "quickstart.py:init=scratch",
                                    "text_finetune.py", "ner.py"])
def test_every_config_has_init_arch_and_takes_list_fields(config, monkeypatch):
    from tljax import config as config_lib

    monkeypatch.chdir(ROOT)
    try:
        loaded = config_lib.load(f"configs/{config}")
    except InputError as e:  # a package the config reads is not installed
        pytest.skip(str(e))
    assert "arch" in loaded.init and "step" in loaded.init
    config_lib.override(loaded, "init.arch", "vit_small_patch16_224")
    config_lib.override(loaded, "mesh", "[('data', 2), ('fsdp', -1)]")
    config_lib.override(loaded, "lr_mults", "[('^head/', 10.0)]")
    config_lib.override(loaded, "sharding_rules", "[('.*', 'fsdp')]")
    config_lib.override(loaded, "schedule", "[{'start_step': 0, 'freeze': 'linear_probe'}]")
    assert loaded.init.arch == "vit_small_patch16_224"
    assert loaded.mesh == [("data", 2), ("fsdp", -1)] and loaded.lr_mults == [("^head/", 10.0)]
    assert loaded.schedule == [{"start_step": 0, "freeze": "linear_probe"}]


def test_inspect_params_without_the_dataset(capsys, monkeypatch):
    from tools import inspect_params

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("TFDS_DATA_DIR", "/nonexistent/tfds")  # cifar10 cannot be read
    assert inspect_params.main(["--config=configs/vit_finetune.py:model=S/16",
                                "--num_classes=7"]) == 0
    out = capsys.readouterr().out
    assert "dataset not read: 7 classes" in out
    head = next(line for line in out.splitlines() if line.startswith("head/kernel"))
    assert head.split()[-1] == f"{384 * 7:,}"  # S/16 width 384, 7 classes
    posemb = next(line for line in out.splitlines() if line.startswith("pos_embedding"))
    assert posemb.split()[-1] == f"{24 * 24 * 384:,}"  # inception_crop(384) / 16 = 24 x 24
    assert inspect_params.main(["--config=configs/vit_finetune.py:model=S/16"]) == 2
    assert "--num_classes=N" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Divergence.

SGD_CONFIG = """
import sys

sys.path.insert(0, {configs!r})
import vit_finetune


def get_config(arg=None):
    config = vit_finetune.get_config("runlocal")
    config.optim = {{"name": "sgd", "momentum": 0.9}}
    return config
"""
# SGD at lr 3 without clipping: the loss grows for a dozen steps, then overflows (step 15).
DIVERGING = {**TINY, "lr": 3.0, "grad_clip_norm": None, "warmup_steps": 0, "total_steps": 40,
             "checkpoint_every_steps": 5, "eval_every_steps": None, "log_every_steps": 5,
             "keep_checkpoints": 2}


def test_nonfinite_loss_stops_and_keeps_the_finite_checkpoints(tmp_path, capfd, monkeypatch,
                                                                fashion_mnist_dir):
    monkeypatch.chdir(ROOT)
    config = tmp_path / "sgd.py"
    config.write_text(SGD_CONFIG.format(configs=str(ROOT / "configs")))
    workdir = tmp_path / "w"
    argv = [f"--config={config}", f"--workdir={workdir}", *_flags(DIVERGING)]
    status, out, err = _run_cli(argv, capfd)
    assert status == 3, err[-3000:]
    line, = err.strip().splitlines()
    step = int(line.split("non-finite at step ")[1].split()[0])
    # Deterministic on CPU (step 15); after checkpoint 10, at the latest at checkpoint 15.
    assert 10 < step <= 15, line
    assert "checkpoint 10 (finite) is kept" in line and "on_nonfinite='skip'" in line
    # Checkpoints 5 and 10, both finite: nothing after the divergence was saved, so no
    # finite checkpoint was rotated out.
    assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "5"]
    for kept in (5, 10):
        variables, _ = checkpoint.load_variables(str(workdir), kept)
        assert all(np.isfinite(v).all() for v in tree.flatten(variables).values())
    assert not (workdir / "results.json").exists()
    records = [json.loads(r) for r in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in records if r["kind"] == "train")

    # The same run with on_nonfinite='skip' resumes from checkpoint 10 and skips the bad
    # updates: every update after the overflow is dropped, the state stays finite.
    status, out, err = _run_cli([*argv, "--config.on_nonfinite=skip"], capfd)
    assert status == 0, err[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert 0 < results["skipped_updates"] <= 40 - 10
    assert "skipped_updates" in out
    variables, _ = checkpoint.load_variables(str(workdir))
    assert all(np.isfinite(v).all() for v in tree.flatten(variables).values())


# ---------------------------------------------------------------------------------------------
# Unreadable checkpoints.


def _corrupt(step_dir: Path, how: str) -> None:
    if how == "truncated":
        data = max(glob.glob(f"{step_dir}/state/ocdbt.process_0/d/*"), key=os.path.getsize)
        os.truncate(data, 100)
    else:
        os.remove(step_dir / "state" / "_METADATA")


@pytest.mark.parametrize("how", ["truncated", "metadata deleted"])
def test_unreadable_newest_checkpoint_falls_back(how, finished, tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(ROOT)
    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir)
    _corrupt(workdir / "checkpoints" / "4", how)
    # Tools (predict) read the newest checkpoint that restores, saying so in one line.
    variables, metadata = checkpoint.load_variables(str(workdir))
    expected, _ = checkpoint.load_variables(str(finished), 2)
    assert metadata["step"] == 2
    for name, value in tree.flatten(expected).items():
        assert value.tobytes() == tree.flatten(variables)[name].tobytes(), name
    err = capfd.readouterr().err
    assert f"Checkpoint 4 in {workdir}/checkpoints cannot be restored" in err
    # A run resumes from checkpoint 2, sets checkpoint 4 aside and trains on.
    status, out, err = _run_cli([CONFIG, f"--workdir={workdir}",
                                 *_flags({**FINISHED, "total_steps": 6})], capfd)
    assert status == 0, err[-3000:]
    assert "Resumed from" in out and "at step 2" in out
    assert "cannot be restored" in err and "Moved unreadable checkpoint 4" in err
    assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "6"]
    assert os.listdir(workdir / "checkpoints_unreadable") == ["4"]


def test_predict_falls_back_to_the_previous_checkpoint(finished, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir)
    _corrupt(workdir / "checkpoints" / "4", "truncated")
    image = tmp_path / "shirt.png"
    _image(image)
    result = subprocess.run([sys.executable, "tools/predict.py", f"--workdir={workdir}",
                             str(image)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Checkpoint 4" in result.stderr and "trying the one before" in result.stderr
    assert result.stdout.strip().endswith(str(image))
    # A wrong-sized image is one line too (the runlocal eval pp does not resize).
    _image(image, size=(40, 40))
    result = subprocess.run([sys.executable, "tools/predict.py", f"--workdir={workdir}",
                             str(image)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "image (1, 40, 40, 3)" in result.stderr.strip().splitlines()[-1]


_ABANDONED_READ = """
import asyncio, gc, sys
from tljax import checkpoint
if sys.argv[1] == "quiet":
    checkpoint._quiet_abandoned_reads()
async def read():
    raise ValueError("OUT_OF_RANGE: Requested byte range is not valid")
loop = asyncio.new_event_loop()
abandoned = loop.create_task(read())
loop.run_until_complete(asyncio.sleep(0.01))
del abandoned
gc.collect()
loop.close()
"""


@pytest.mark.parametrize("mode", ["quiet", "default"])
def test_abandoned_checkpoint_reads_are_not_reported_after_a_fallback(mode):
    """Whether Orbax's abandoned reads end up reported depends on timing; this makes one
    such report on purpose (asyncio's 'Task exception was never retrieved')."""
    result = subprocess.run([sys.executable, "-c", _ABANDONED_READ, mode], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    if mode == "quiet":
        assert "never retrieved" not in result.stderr and "Traceback" not in result.stderr, \
            result.stderr[-3000:]
    else:  # without the filter, the report and its traceback would be printed
        assert "never retrieved" in result.stderr and "Traceback" in result.stderr


def test_only_reports_raised_in_checkpoint_io_count_as_abandoned_reads():
    import asyncio

    with pytest.raises(ValueError) as in_asyncio:
        asyncio.run(None)  # raised inside asyncio's own code
    with pytest.raises(ValueError) as in_user_code:
        raise ValueError("a user's own error")
    assert checkpoint._raised_in_checkpoint_io(in_asyncio.tb)
    assert not checkpoint._raised_in_checkpoint_io(in_user_code.tb)


# ---------------------------------------------------------------------------------------------
# The workdir lock.


def test_a_second_run_on_a_workdir_is_refused_at_once(tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(ROOT)
    workdir = tmp_path / "w"
    holder = RunDir(str(workdir))
    holder.claim()
    try:
        start = time.time()
        status, out, err = _run_cli([CONFIG, f"--workdir={workdir}"], capfd)
        assert status == 2 and time.time() - start < 5
        line, = err.strip().splitlines()
        assert f"is in use by another run: pid {os.getpid()} on host {socket.gethostname()}" \
            in line
    finally:
        holder.release()
    assert os.listdir(workdir) == [".lock"]  # the refused run wrote nothing


def test_the_lock_of_a_dead_run_is_taken_over(tmp_path):
    workdir = tmp_path / "w"
    script = ("import sys, time; from tljax.workdir import RunDir; "
              f"RunDir({str(workdir)!r}).claim(); print('locked', flush=True); time.sleep(60)")
    process = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "locked"
        with pytest.raises(InputError, match=f"pid {process.pid} on host"):
            RunDir(str(workdir))
    finally:
        process.kill()
        process.wait()
    assert json.loads((workdir / ".lock").read_text())["pid"] == process.pid  # stale now
    run = RunDir(str(workdir))
    run.claim()
    assert json.loads((workdir / ".lock").read_text())["pid"] == os.getpid()
    run.release()


def _peer_probe(workdir) -> int:
    """An fd holding the lock as another process's start-up probe holds it, for an instant."""
    fd = os.open(os.path.join(workdir, workdir_lib.LOCK), os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    return fd


def test_the_processes_of_one_run_do_not_refuse_each_others_probe(tmp_path):
    """All processes of a multi-process run probe the workdir as they start, at the same time."""
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / workdir_lib.LOCK).write_text('{"pid": 1}')  # left by an earlier, finished run
    fd = _peer_probe(workdir)
    try:
        RunDir(str(workdir))  # process 0's probe, while process 1's holds the lock
    finally:
        os.close(fd)


def test_claim_waits_out_a_probe_but_not_a_run(tmp_path):
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / workdir_lib.LOCK).write_text("")
    run, second = RunDir(str(workdir)), RunDir(str(workdir))  # two runs started at once
    fd = _peer_probe(workdir)
    threading.Timer(0.3, os.close, (fd,)).start()  # a probe ends within microseconds
    run.claim()
    assert json.loads((workdir / workdir_lib.LOCK).read_text())["pid"] == os.getpid()
    RunDir(str(workdir), probe_lock=False)  # process 1 of this run, there after 0 claimed
    start = time.monotonic()
    with pytest.raises(InputError, match="in use by another run"):
        second.claim()  # a live run's lock is not waited out
    assert time.monotonic() - start < workdir_lib.PROBE_WAIT_S + 1
    run.release()


# ---------------------------------------------------------------------------------------------
# Bad examples skipped.


def test_bad_examples_are_skipped_and_counted(tmp_path, capfd, monkeypatch, bad_data):
    from tljax import data

    monkeypatch.chdir(ROOT)
    dataset = f"folder:{bad_data}/corrupt"
    # Eval: the bad example becomes padding (mask False), so it is not counted.
    batches = data.eval_batches(dataset=dataset, split="train", pp="decode", batch_size=4,
                                on_bad_example="skip")
    batch = next(iter(batches))
    assert batch["mask"].tolist() == [True, True, False, False]  # a/0, b/1, b/bad, padding
    assert batches.bad_examples.count == 1
    # Training: a run on the folder skips it, names it once and counts it in the log.
    workdir = tmp_path / "w"
    status, out, err = _run_cli(
        [CONFIG, f"--workdir={workdir}", *_flags({
            **TINY, "input.dataset": dataset, "input.split": "train", "eval.split": "test",
            "input.batch_size": 4, "eval.batch_size": 4, "total_steps": 2,
            "checkpoint_every_steps": 2, "eval_every_steps": None,
            "input.on_bad_example": "skip"})], capfd)
    assert status == 0, err[-3000:]
    assert f"Skipping bad example {bad_data}/corrupt/train/b/bad.png" in err
    assert "bad_examples" in out
    assert json.loads((workdir / "results.json").read_text())["bad_examples_skipped"] > 0


# ---------------------------------------------------------------------------------------------
# Preemption and kills: processes of the real command line, compared bitwise.

# 60 steps with a checkpoint every 3 and five evaluations: saves are a large share of the time.
STORM = {**TINY, "total_steps": 60, "warmup_steps": 3, "log_every_steps": 1,
         "eval_every_steps": 12, "checkpoint_every_steps": 3, "keep_checkpoints": 2}


def _start(workdir: Path, log: Path) -> subprocess.Popen:
    with open(log, "a") as f:
        return subprocess.Popen([sys.executable, "-m", "tljax.main", CONFIG,
                                 f"--workdir={workdir}", *_flags(STORM)], cwd=ROOT,
                                stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _records(workdir: Path) -> list[dict]:
    """metrics.jsonl without the timing fields, which differ between runs."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in ("examples_per_s", "eta_s")}
            for line in lines]


def _assert_same_run(expected: Path, actual: Path) -> None:
    reference, _ = checkpoint.load_variables(str(expected))
    variables, _ = checkpoint.load_variables(str(actual))
    for name, value in tree.flatten(reference).items():
        assert value.tobytes() == tree.flatten(variables)[name].tobytes(), name
    assert _records(actual) == _records(expected)
    assert (json.loads((actual / "results.json").read_text())["final_eval"]
            == json.loads((expected / "results.json").read_text())["final_eval"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, fashion_mnist_dir) -> Path:
    workdir = tmp_path_factory.mktemp("reference") / "run"
    process = _start(workdir, workdir.parent / "log")
    assert process.wait(timeout=900) == 0, (workdir.parent / "log").read_text()[-3000:]
    return workdir


def _train_steps(workdir: Path) -> list[int]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()[:-1])
            if r["kind"] == "train"]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resumes_exactly(reference, tmp_path):
    workdir, log = tmp_path / "run", tmp_path / "log"
    process = _start(workdir, log)
    deadline = time.time() + 600
    while not [s for s in _train_steps(workdir) if s >= 4]:
        assert process.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=300) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    text = log.read_text()
    stopped = int(text.split("Stopped by SIGTERM after step ")[1].split(":")[0])
    assert "Traceback" not in text and stopped < STORM["total_steps"]
    assert (workdir / "checkpoints" / str(stopped)).is_dir()
    assert not (workdir / "results.json").exists()
    process = _start(workdir, log)
    assert process.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert f"Resumed from {workdir}/checkpoints at step {stopped}" in log.read_text()
    _assert_same_run(reference, workdir)


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_after_the_same_step(tmp_path,
                                                                       fashion_mnist_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = tmp_path / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    logs = [tmp_path / f"log{i}" for i in range(2)]
    processes = []
    for i, log in enumerate(logs):
        with open(log, "w") as f:
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "tljax.main", CONFIG, f"--workdir={workdir}",
                 *_flags({**STORM, "total_steps": 400}),
                 f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                 f"--process_id={i}"], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT))
    try:
        deadline = time.time() + 600
        while not [s for s in _train_steps(workdir) if s >= 3]:
            assert all(p.poll() is None for p in processes) and time.time() < deadline, \
                logs[0].read_text()[-3000:]
            time.sleep(0.05)
        processes[1].send_signal(signal.SIGTERM)  # process 0 never gets a signal
        statuses = [p.wait(timeout=300) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    texts = [log.read_text() for log in logs]
    assert statuses == [128 + signal.SIGTERM] * 2, texts[0][-2000:] + texts[1][-2000:]
    stopped = {int(t.split("Stopped by SIGTERM after step ")[1].split(":")[0]) for t in texts}
    assert len(stopped) == 1, stopped
    assert (workdir / "checkpoints" / str(stopped.pop())).is_dir()


def _tmp_saves(workdir: Path) -> set[str]:
    return set(glob.glob(f"{workdir}/checkpoints/*.orbax-checkpoint-tmp*"))


def _saved_steps(workdir: Path) -> list[int]:
    folder = workdir / "checkpoints"
    return sorted(int(s) for s in os.listdir(folder) if s.isdigit()) if folder.is_dir() else []


def _reached(moment: str, target: float, workdir: Path, leftover: set[str],
             start: float) -> bool:
    """Whether a kill's moment came: a save of step >= target in progress, a train step >=
    target logged, or target seconds since the start."""
    if moment == "save":
        return any(int(os.path.basename(p).split(".")[0]) >= target
                   for p in _tmp_saves(workdir) - leftover)
    if moment == "step":
        return any(s >= target for s in _train_steps(workdir))
    return time.time() - start >= target


@pytest.mark.slow
def test_kill_storm_ends_bitwise_equal_to_an_uninterrupted_run(reference, tmp_path):
    """SIGKILL at 10 seeded random moments of 10 restarts: during start-up (a random time),
    after a random training step, or during a checkpoint save (while its temporary folder
    exists; the second save of that restart, so that it progresses)."""
    workdir, log = tmp_path / "run", tmp_path / "log"
    rng = np.random.default_rng(20261128)
    during_saves, story = 0, []
    for kill in range(10):
        resumed = max(_saved_steps(workdir), default=0)
        leftover = _tmp_saves(workdir)
        moment, target, extra = (
            ("save", resumed + 2 * STORM["checkpoint_every_steps"], rng.uniform(0, 0.02))
            if kill % 2 else ("step", resumed + int(rng.integers(1, 7)), rng.uniform(0, 0.3))
            if kill % 4 == 2 else ("time", rng.uniform(0.5, 4.0), 0.0))
        process = _start(workdir, log)
        start = time.time()
        while (not _reached(moment, target, workdir, leftover, start)
               and process.poll() is None and time.time() < start + 600):
            time.sleep(0.002)
        time.sleep(extra)
        assert process.poll() is None, "the run ended before its kill"
        process.send_signal(signal.SIGKILL)
        process.wait()
        mid_save = bool(_tmp_saves(workdir) - leftover)
        during_saves += mid_save
        story.append(f"{moment}@{time.time() - start:.1f}s:{resumed}->"
                     f"{max(_saved_steps(workdir), default=0)}{'*' if mid_save else ''}")
    process = _start(workdir, log)
    assert process.wait(timeout=600) == 0, log.read_text()[-3000:]
    # Each kill: its moment, seconds after the start, newest checkpoint before -> after,
    # * when a save was in progress.
    print(f"kill storm: {len(story)} kills, {during_saves} during a save: {' '.join(story)}")
    assert during_saves >= 3
    _assert_same_run(reference, workdir)
