"""Third-party plugins installed for real (pip --target), found through entry points."""

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import FAST, ROOT, run_cli

EXAMPLE = ROOT / "examples" / "llmzoo-example-plugin"


def pip_install(target, path):
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(path)], check=True, capture_output=True)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A folder holding the example plugin and a plugin package that fails on import."""
    site = tmp_path_factory.mktemp("site")
    pip_install(site, EXAMPLE)
    broken = tmp_path_factory.mktemp("broken_src")
    (broken / "broken_llmzoo_plugin").mkdir()
    (broken / "broken_llmzoo_plugin" / "__init__.py").write_text("raise ImportError('needs libfoo 9')\n")
    (broken / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "broken-llmzoo-plugin"
        version = "0.0.1"
        [project.entry-points.llmzoo]
        broken = "broken_llmzoo_plugin"
        [tool.setuptools]
        packages = ["broken_llmzoo_plugin"]
        """))
    pip_install(site, broken)
    return site


def env_with(site, **extra):
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]), **extra}


def test_plugins_lists_third_party_options_and_reports_broken_ones(site):
    out = run_cli("llmzoo", "plugins", env=env_with(site), check=False)
    assert "block=shortconv" in out.stdout and "[llmzoo-example-plugin]" in out.stdout
    assert "block=dense" in out.stdout and "[llmzoo]" in out.stdout
    assert "plugin 'broken' from package 'broken-llmzoo-plugin' failed to load: ImportError: needs libfoo 9" in out.stderr
    assert out.returncode == 1  # a broken plugin is an error, but the others still listed

    quiet = run_cli("llmzoo", "plugins", env=env_with(site, LLMZOO_DISABLE_PLUGIN_AUTOLOAD="1"))
    assert "shortconv" not in quiet.stdout and "block=dense" in quiet.stdout and "broken" not in quiet.stderr


def test_example_plugin_trains_and_generates(site, tmp_path):
    run = tmp_path / "run"
    run_cli("llmzoo-train", "block=shortconv", f"run_dir={run}", *FAST, "trainer.max_steps=20",
            "trainer.val_every=10", env=env_with(site))
    import csv

    rows = [r for r in csv.DictReader(open(run / "metrics.csv")) if r.get("val_loss")]
    assert float(rows[-1]["val_loss"]) < float(rows[0]["val_loss"])
    out = run_cli("llmzoo-generate", f"run_dir={run}", "prompt=Once", "max_new_tokens=5", env=env_with(site))
    assert out.stdout.startswith("Once")
    bad = run_cli("llmzoo-train", "block=shortconv", "block.kernel_size=1", f"run_dir={tmp_path / 'bad'}", *FAST,
                  env=env_with(site), check=False)
    assert bad.returncode == 2 and "block.kernel_size must be at least 2" in bad.stderr


def test_example_block_passes_conformance():
    sys.path.insert(0, str(EXAMPLE))
    try:
        from llmzoo_example_plugin import ShortConvBlock

        from llmzoo.testing import check_block

        check_block(lambda: ShortConvBlock(dim=16, kernel_size=3), 16)
    finally:
        sys.path.remove(str(EXAMPLE))
