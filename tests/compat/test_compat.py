"""The compatibility promise (DESIGN.md section 3): frozen plugin packages written to the
published contract keep working. ``llmzoo-compat-v2`` implements all five interfaces with
contract 2's import paths, and holds a block written to the first release (it declares
only ``recurrent``); it is installed for real (pip --target) and found through entry points."""

import csv
import sys
from pathlib import Path

import pytest
import torch

from conftest import FAST, pip_install, plugin_package, run_cli

COMPAT = Path(__file__).parent / "llmzoo-compat-v2"
STACK = ["block=compat_ema", "tokenizer=compat_chars", "objective=compat_next_token", "parallel=compat_single"]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The frozen package, and a package whose hook implementation is misspelt."""
    site = tmp_path_factory.mktemp("compat_site")
    pip_install(site, COMPAT)
    bad = plugin_package(tmp_path_factory.mktemp("misspelt_src"), "llmzoo-misspelt-plugin", "misspelt",
                         "misspelt_llmzoo_plugin", """
        from llmzoo import hookimpl

        @hookimpl
        def llmzoo_conf_pth():
            return None
        """)
    pip_install(site, bad)
    return site


@pytest.fixture()
def importable(site):
    from llmzoo.plugins import reset_plugin_manager

    sys.path.insert(0, str(site))
    reset_plugin_manager()  # find the installed packages' entry points
    yield
    sys.path.remove(str(site))
    reset_plugin_manager()


def env_with(site):
    return {"PYTHONPATH": str(site)}


def test_contract_2_plugins_pass_their_conformance_checks(importable):
    import llmzoo
    from conftest import tiny_cfg
    from llmzoo.testing import check_block, check_decoder, check_objective, check_tokenizer

    from llmzoo_compat_v2 import CharTokenizer, EmaBlock, FullForwardGreedy, NextToken

    check_block(lambda: EmaBlock(16), 16)
    check_tokenizer(CharTokenizer(), texts=["hello", "", "héllo\nworld"])
    model = llmzoo.build_model(tiny_cfg("model.vocab_size=259"))
    check_decoder(FullForwardGreedy(), model, equals_greedy=True)
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(0))
    check_objective(NextToken(), model, {"input_ids": ids, "labels": ids.clone()})


def test_first_release_capabilities_imply_stateful(importable):
    from llmzoo import compose
    from llmzoo.interfaces import STATEFUL, capabilities_of

    from llmzoo_compat_v2 import EmaBlock

    assert EmaBlock.capabilities == frozenset({"recurrent"})  # as declared, unchanged
    assert STATEFUL in capabilities_of(EmaBlock) and STATEFUL in capabilities_of(EmaBlock(8))
    from llmzoo import ConfigError

    for decoder in ("greedy", "beam"):  # each requires "stateful"; none says "lacks ['stateful']"
        compose(overrides=["block=compat_ema", f"decoder={decoder}"])
    with pytest.raises(ConfigError, match=r"lacks \['static_state'\] \(it has \['recurrent', 'stateful'\]\)"):
        compose(overrides=["block=compat_ema", "decoder=static"])  # what it really lacks is still refused


def test_old_import_paths_resolve_with_a_deprecation_warning():
    import llmzoo.shared.decoding
    import llmzoo.shared.losses

    with pytest.warns(DeprecationWarning, match=r"llmzoo\.losses\.next_token_loss moved to llmzoo\.shared\.losses"):
        from llmzoo.losses import next_token_loss
    assert next_token_loss is llmzoo.shared.losses.next_token_loss
    with pytest.warns(DeprecationWarning, match="llmzoo.shared.decoding"):
        from llmzoo.decoding import Sampler
    assert Sampler is llmzoo.shared.decoding.Sampler
    with pytest.raises(ImportError):
        from llmzoo.decoding import no_such_name  # noqa: F401


def test_contract_2_stack_trains_and_the_first_release_block_decodes_with_greedy(site, tmp_path):
    run = tmp_path / "run"
    run_cli("llmzoo-train", *STACK, "decoder=compat_greedy", f"run_dir={run}", *FAST, "model=tiny",
            "trainer.max_steps=16", "trainer.val_every=8", "data.seq_len=32", "data.batch_size=8",
            env=env_with(site))
    rows = [r for r in csv.DictReader(open(run / "metrics.csv")) if r.get("val_loss")]
    assert len(rows) == 2 and float(rows[-1]["val_loss"]) < float(rows[0]["val_loss"])
    # built-in stateful greedy (EmaState advanced token by token) == the plugin's full-forward greedy
    outs = [run_cli("llmzoo-generate", f"run_dir={run}", "prompt=The ", "max_new_tokens=12", f"decoder={d}",
                    env=env_with(site)).stdout for d in ("greedy", "compat_greedy")]
    assert outs[0].startswith("The ") and outs[0] == outs[1]
    listed = run_cli("llmzoo", "plugins", env=env_with(site), check=False).stdout
    assert "compat-v2 (llmzoo-compat-v2, contract 2)" in listed


def test_a_misspelt_hook_implementation_is_refused_naming_its_package(site):
    out = run_cli("llmzoo", "plugins", env=env_with(site), check=False)
    assert out.returncode == 1
    assert ("plugin 'misspelt' from package 'llmzoo-misspelt-plugin' failed to load: @hookimpl 'llmzoo_conf_pth' "
            "matches no llmzoo hook") in out.stderr
    assert "block=compat_ema" in out.stdout and "block=dense" in out.stdout  # the others still load
