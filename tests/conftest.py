import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Overrides that make a CLI training run small and quiet.
FAST = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "logger=[]",
        "sample.prompts=[]"]


@pytest.fixture(autouse=True, scope="session")
def _datasets_cache(tmp_path_factory):
    os.environ["HF_DATASETS_CACHE"] = str(tmp_path_factory.mktemp("hf_datasets"))


def run_cli(*args, env=None, check=True, timeout=600, cwd=None):
    """Run an llmzoo console script; return CompletedProcess with text output."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def train_run(*overrides):
    """What ``llmzoo-train <overrides>`` does, in this process: compose, then ``llmzoo.train``
    (the command's ~6 s of start-up saved). For runs a test needs, not for testing the command
    itself (exit codes, Hydra's sweeps and folders) nor for multi-process strategies, whose
    launcher starts the command again. Returns the run summary."""
    import llmzoo

    return llmzoo.train(llmzoo.compose(overrides=list(overrides)))


def tiny_cfg(*overrides):
    import llmzoo

    return llmzoo.compose(overrides=["model=tiny", *overrides])


# Two fp32 AdamW steps on a fixed global batch: the runs that parallel strategies are
# compared against (tests/test_fsdp.py, tests/test_parallel.py).
# data.packing=concat: the same rows for every strategy, the pipeline (which does not take packed
# rows) included; tests/test_ddp.py and the example strategy compare packed (document) runs.
PARALLEL_COMMON = [*FAST, "trainer.max_steps=2", "trainer.val_every=0", "trainer.log_every_n_steps=1",
                   "trainer.accelerator=cpu", "optim.warmup_steps=1", "seed=3", "data.packing=concat"]


def logged(run_dir, column="train_loss"):
    """[(step, value)] of ``column`` in a run's metrics.csv (rows that have it)."""
    import csv

    with open(run_dir / "metrics.csv") as fh:
        return [(int(r["step"]), float(r[column])) for r in csv.DictReader(fh) if r.get(column)]


@pytest.fixture(scope="session")
def single_process_run(tmp_path_factory):
    """One process, global batch 8, the tiny model: the reference for every strategy."""
    run_dir = tmp_path_factory.mktemp("parallel_reference") / "single"
    train_run("parallel=single", "data.batch_size=8", f"run_dir={run_dir}", *PARALLEL_COMMON)
    return run_dir


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
    """pretrained(block="dense", steps=300) -> a run folder of the tiny model trained on the
    bundled corpus; made once per session for each (block, steps) and shared by tests
    that start from a pretrained model (Medusa, the post-training chain, RL)."""
    cache = {}

    def make(block: str = "dense", steps: int = 300):
        if (block, steps) not in cache:
            run = tmp_path_factory.mktemp(f"pretrained_{block}_{steps}") / "run"
            train_run(f"block={block}", f"run_dir={run}", f"trainer.max_steps={steps}", *FAST)
            cache[block, steps] = run
        return cache[block, steps]

    return make


def pip_install(target, *paths):
    """Install packages for real into ``target`` (pip --target), as a user's pip would."""
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), *map(str, paths)], check=True, capture_output=True)


def plugin_package(root, dist: str, name: str, module: str, source: str):
    """The source folder of a one-module plugin package ``dist`` whose module ``module``
    (holding ``source``) is registered as ``name`` under the ``llmzoo`` entry-point group."""
    import textwrap

    (root / module).mkdir()
    (root / module / "__init__.py").write_text(textwrap.dedent(source))
    (root / "pyproject.toml").write_text(textwrap.dedent(f"""
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "{dist}"
        version = "0.0.1"
        [project.entry-points.llmzoo]
        {name} = "{module}"
        [tool.setuptools]
        packages = ["{module}"]
        """))
    return root
