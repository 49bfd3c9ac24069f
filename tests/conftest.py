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
FAST = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.tensorboard=false",
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


def tiny_cfg(*overrides):
    import llmzoo

    return llmzoo.compose(overrides=["model=tiny", *overrides])


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
    """pretrained(block="dense", steps=300) -> a run folder of the tiny model trained on the
    bundled corpus; made once per session for each (block, steps) and shared by tests
    that start from a pretrained model (Medusa, the post-training chain, RL)."""
    cache = {}

    def make(block: str = "dense", steps: int = 300):
        if (block, steps) not in cache:
            run = tmp_path_factory.mktemp(f"pretrained_{block}_{steps}") / "run"
            run_cli("llmzoo-train", f"block={block}", f"run_dir={run}", f"trainer.max_steps={steps}", *FAST)
            cache[block, steps] = run
        return cache[block, steps]

    return make
