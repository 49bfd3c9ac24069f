"""Third-party plugins installed for real (pip --target), found through entry points."""

import os
import sys

import pytest
import torch

from conftest import FAST, ROOT, pip_install, plugin_package, run_cli

EXAMPLE = ROOT / "examples" / "llmzoo-example-plugin"
# one example package per interface (docs/plugins.md walks through them)
EXAMPLES = {"block": EXAMPLE, **{kind: ROOT / "examples" / f"llmzoo-example-{kind}"
                                  for kind in ("tokenizer", "objective", "decoder", "strategy")}}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A folder holding the five example plugins and a plugin package that fails on import."""
    site = tmp_path_factory.mktemp("site")
    pip_install(site, *EXAMPLES.values())
    broken = plugin_package(tmp_path_factory.mktemp("broken_src"), "broken-llmzoo-plugin", "broken",
                            "broken_llmzoo_plugin", "raise ImportError('needs libfoo 9')\n")
    pip_install(site, broken)
    return site


def env_with(site, **extra):
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]), **extra}


def test_plugins_lists_third_party_options_and_reports_broken_ones(site):
    out = run_cli("llmzoo", "plugins", env=env_with(site), check=False)
    assert "block=shortconv" in out.stdout and "[llmzoo-example-plugin]" in out.stdout
    for option, package in (("tokenizer=example_kmer", "tokenizer"), ("objective=example_simpo", "objective"),
                            ("decoder=min_p", "decoder"), ("parallel=recompute", "strategy"),
                            ("kernels=fused_gate_up", "plugin")):
        assert option in out.stdout and f"[llmzoo-example-{package}]" in out.stdout, option
    assert "block=dense" in out.stdout and "[llmzoo]" in out.stdout and "kernels=liger" in out.stdout
    assert "plugin 'broken' from package 'broken-llmzoo-plugin' failed to load: ImportError: needs libfoo 9" in out.stderr
    assert out.returncode == 1  # a broken plugin is an error, but the others still listed

    quiet = run_cli("llmzoo", "plugins", env=env_with(site, LLMZOO_DISABLE_PLUGIN_AUTOLOAD="1"))
    assert "shortconv" not in quiet.stdout and "block=dense" in quiet.stdout and "broken" not in quiet.stderr


def test_example_plugin_trains_and_generates(site, tmp_path):
    run = tmp_path / "run"
    run_cli("llmzoo-train", "block=shortconv", f"run_dir={run}", *FAST, "trainer.max_steps=12",
            "trainer.val_every=6", env=env_with(site))
    import csv

    rows = [r for r in csv.DictReader(open(run / "metrics.csv")) if r.get("val_loss")]
    assert float(rows[-1]["val_loss"]) < float(rows[0]["val_loss"])
    out = run_cli("llmzoo-generate", f"run_dir={run}", "prompt=Once", "max_new_tokens=5", env=env_with(site))
    assert out.stdout.startswith("Once")
    bad = run_cli("llmzoo-train", "block=shortconv", "block.kernel_size=1", f"run_dir={tmp_path / 'bad'}", *FAST,
                  env=env_with(site), check=False)
    assert bad.returncode == 2 and "block: kernel_size must be at least 2, got 1" in bad.stderr


def test_example_block_passes_conformance():
    sys.path.insert(0, str(EXAMPLE))
    try:
        from llmzoo_example_plugin import ShortConvBlock

        from llmzoo.testing import check_block

        check_block(lambda: ShortConvBlock(dim=16, kernel_size=3), 16)
    finally:
        sys.path.remove(str(EXAMPLE))


def test_example_kernels_pass_check_kernels_and_compose_by_name(site, examples_importable):
    from llmzoo_example_plugin import FusedGateUp

    import llmzoo
    from conftest import tiny_cfg
    from llmzoo.testing import check_kernels

    model = llmzoo.build_model(tiny_cfg("model.vocab_size=64"))
    check_kernels(FusedGateUp(), model, torch.randint(0, 64, (2, 10)), atol=1e-5)


@pytest.fixture()
def examples_importable(site):
    sys.path.insert(0, str(site))
    yield
    sys.path.remove(str(site))


def test_example_tokenizer_passes_its_check_and_trains_on_dna(site, examples_importable, tmp_path):
    from llmzoo_example_tokenizer import KmerTokenizer

    from llmzoo.testing import check_tokenizer

    check_tokenizer(KmerTokenizer(k=3), texts=["ACGTACGTA", "ACG\nTTN", "", "A"])
    g = torch.Generator().manual_seed(0)
    dna = "\n".join("".join("ACGT"[int(i)] for i in torch.randint(0, 4, (96,), generator=g)) for _ in range(200))
    (tmp_path / "dna.txt").write_text(dna)
    run = tmp_path / "run"
    run_cli("llmzoo-train", "tokenizer=example_kmer", f"data.path={tmp_path / 'dna.txt'}", f"run_dir={run}", *FAST,
            "trainer.max_steps=3", "trainer.val_every=0", env=env_with(site))
    out = run_cli("llmzoo-generate", f"run_dir={run}", "prompt=ACGTAC", "max_new_tokens=4", env=env_with(site))
    assert out.stdout.startswith("ACGTAC") and set(out.stdout.strip()) <= set("ACGTN\n")
    bad = run_cli("llmzoo-train", "tokenizer=example_kmer", f"run_dir={tmp_path / 'bad'}", *FAST, "trainer.max_steps=1",
                  env=env_with(site), check=False)  # the bundled English corpus is not DNA
    assert bad.returncode != 0 and "is not one of ['A', 'C', 'G', 'T', 'N']" in bad.stderr


def test_example_objective_decoder_and_strategy_pass_their_checks(site, examples_importable, tmp_path):
    from llmzoo_example_decoder import MinP
    from llmzoo_example_objective import SimPO

    import llmzoo
    from conftest import tiny_cfg
    from llmzoo.testing import check_decoder, check_objective, check_strategy
    from llmzoo_plugins.chat_data import RecordsDataModule, encode_record
    from llmzoo_plugins.tokenizers import ByteTokenizer

    tok = ByteTokenizer()
    rows = [encode_record(tok, {"prompt": p, "chosen": c, "rejected": r}, "preferences", 64)
            for p, c, r in (("Hi?", "Hello!", "No."), ("2+2?", "4", "five"), ("Sky?", "Blue.", "Green, I think."),
                            ("Pet?", "A cat.", "?"))]
    batch = RecordsDataModule(tok, path="-", kind="preferences", seq_len=64).collate(rows)
    model = llmzoo.build_model(tiny_cfg("model.vocab_size=259"))
    check_objective(SimPO(), model, batch)
    check_decoder(MinP(min_p=0.05, seed=1), model)
    # the strategy over 2 processes: the same losses as one plain process on the same global batch
    check_strategy(["parallel=recompute", "trainer.devices=2"], tmp_path / "recompute", batch_size=4,
                   env=env_with(site))
    # SimPO trains, and the run's closing samples come from the min_p decoder
    out = run_cli("llmzoo-train", "objective=example_simpo", "data=preferences", "decoder=min_p", f"run_dir={tmp_path / 'simpo'}",
                  *FAST, "sample.prompts=[Hello]", "sample.max_new_tokens=4", "trainer.max_steps=2",
                  "trainer.val_every=0", env=env_with(site))
    assert "--- sample ---\nHello" in out.stdout


def test_an_option_two_packages_define_is_reported_as_shadowed(monkeypatch):
    """The first package on the config search path wins; the other one's option is flagged."""
    from types import SimpleNamespace

    from llmzoo import config

    docs = [SimpleNamespace(group="tokenizer", name="kmer", path="a.yaml", info=SimpleNamespace(distribution="llmzoo")),
            SimpleNamespace(group="tokenizer", name="kmer", path="b.yaml", info=SimpleNamespace(distribution="dna-pkg")),
            SimpleNamespace(group="tokenizer", name="byte", path="c.yaml", info=SimpleNamespace(distribution="llmzoo"))]
    monkeypatch.setattr(config, "conf_docs", lambda: docs)
    (winner, other), = config.shadowed_options()
    assert (winner.group, winner.name, winner.distribution, other) == ("tokenizer", "kmer", "llmzoo", "dna-pkg")
    assert [o.distribution for o in config.list_options() if o.name == "kmer"] == ["llmzoo"]


def _imported_modules(path) -> set[str]:
    import ast

    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):  # lazy imports inside functions count too
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_layout_rules_plugins_never_import_each_other_and_core_imports_no_plugin():
    """DESIGN.md section 1: what two plugins share lives in core."""
    offenders = [f"{p.relative_to(ROOT)} imports {m}" for p in sorted((ROOT / "plugins").glob("*.py"))
                 for m in _imported_modules(p) if m.split(".")[0] == "llmzoo_plugins"]
    offenders += [f"{p.relative_to(ROOT)} imports {m}" for p in sorted((ROOT / "core").rglob("*.py"))
                  for m in _imported_modules(p) if m.split(".")[0] == "llmzoo_plugins"]
    # nor names a plugin module, class or path scheme in code (the built-in package name itself is
    # known to the registry; docstrings and comments may give examples)
    offenders += [f"{p.relative_to(ROOT)} names {s!r}" for p in sorted((ROOT / "core").rglob("*.py"))
                  for s in _code_strings(p) if "llmzoo_plugins." in s or s.startswith("hf:")]
    assert offenders == []


def _code_strings(path) -> list[str]:
    import ast

    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef))
            and n.body and isinstance(n.body[0], ast.Expr)}
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docs]


def _core_import_graph() -> dict[str, set[str]]:
    """{core module: the core modules it imports, lazily or not} (relative imports resolved)."""
    import ast

    graph = {}
    for path in (ROOT / "core").rglob("*.py"):
        parts = path.relative_to(ROOT / "core").with_suffix("").parts
        name = ".".join(("llmzoo", *parts))[: -len(".__init__")] if parts[-1] == "__init__" else \
            ".".join(("llmzoo", *parts))
        package = name if parts[-1] == "__init__" else name.rpartition(".")[0]
        found = set()
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for b in ast.walk(tree) if isinstance(b, ast.If) and "TYPE_CHECKING" in ast.unparse(b.test)
                       for n in ast.walk(b)}
        for node in ast.walk(tree):
            if id(node) in typing_only:  # annotations only: not imported at run time
                continue
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                module = ".".join([*base, node.module] if node.module else base) if node.level else node.module
                found.update(f"{module}.{a.name}" for a in node.names)
                found.add(module or "")
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        graph[name] = found
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def test_core_import_graph_has_no_cycle():
    """core/api.py and core/hf.py imported each other until contract 3; no module of core
    may import (even lazily) one that imports it back. The package root re-exports and is
    left out, as the deprecated aliases are (they only forward names)."""
    graph = _core_import_graph()
    graph = {m: {d for d in deps if d != "llmzoo"} for m, deps in graph.items() if m != "llmzoo"}
    cycles = []

    def visit(m, path):
        for d in graph.get(m, ()):
            if d in path:
                cycles.append(" -> ".join(path[path.index(d):] + [d]))
            elif len(path) < 12:
                visit(d, path + [d])

    for m in graph:
        visit(m, [m])
    assert cycles == []


# core/*.py (the contract and its glue) must stay small: DESIGN.md says under 2,500 lines,
# which contract 3 has not reached yet (issue 31); this budget only ever goes down.
CORE_LINE_BUDGET = 3450


def test_core_stays_within_its_line_budget():
    lines = sum(len(p.read_text().splitlines()) for p in (ROOT / "core").glob("*.py"))
    assert lines <= CORE_LINE_BUDGET, f"core/*.py holds {lines} lines (budget {CORE_LINE_BUDGET})"


def optional_member_lines() -> list[str]:
    """One line per optional member core reads (the fields of the ``*Extras`` records in
    core/interfaces.py), with its type and default, as docs/plugins.md must list them."""
    import dataclasses

    from llmzoo import interfaces

    def shown(value):
        if isinstance(value, frozenset):  # a stable order (set order follows string hashing)
            return "frozenset({" + ", ".join(repr(v) for v in sorted(value)) + "})"
        return repr(value)

    lines = []
    for cls in (interfaces.BlockExtras, interfaces.TokenizerExtras, interfaces.ObjectiveExtras,
                interfaces.DecoderExtras, interfaces.StrategyExtras, interfaces.DataModuleExtras):
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"- `{cls.__name__}.{f.name}: {f.type}` (default `{shown(default)}`)")
    return lines


def test_docs_list_every_optional_member_with_its_type():
    doc = (ROOT / "docs" / "plugins.md").read_text()
    missing = [line for line in optional_member_lines() if line not in doc]
    assert not missing, "docs/plugins.md lacks (or has another type for) these lines:\n" + "\n".join(missing)


def test_every_member_core_probes_is_an_extras_field_or_documented():
    """Core reads optional members through ``XExtras.of(thing)``; the few attributes it
    still probes by name must be documented for plugin authors too (or be torch's,
    Lightning's or datasets' own)."""
    import ast
    import dataclasses
    import re

    from llmzoo import interfaces

    fields = {f.name for cls in vars(interfaces).values() if isinstance(cls, type)
              and issubclass(cls, interfaces.Extras) and cls is not interfaces.Extras for f in dataclasses.fields(cls)}
    not_plugins = {"to_local", "_experiment", "finish", "distributed_sampler_kwargs", "dtype", "trainer",
                   "datamodule", "__name__"}  # torch / Lightning / datasets attributes, not contract
    doc = (ROOT / "docs" / "plugins.md").read_text()
    probed = []
    for path in (ROOT / "core").glob("*.py"):  # the contract and its glue (not llmzoo.shared / .testing)
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
                    and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)):
                probed.append((node.args[1].value, path.relative_to(ROOT).as_posix()))
    undocumented = sorted({(name, where) for name, where in probed
                           if name not in fields and name not in not_plugins
                           and not re.search(rf"`[^`]*\b{re.escape(name)}\b[^`]*`", doc)})
    assert not undocumented, f"core probes members docs/plugins.md does not name: {undocumented}"
    assert len(probed) <= 20, f"{len(probed)} getattr/hasattr probes in core: read optional members through XExtras.of"


def test_built_in_entry_points_are_exactly_the_modules_that_implement_hooks():
    """An entry point registers a module with pluggy: one without hooks has nothing to
    register, and a module with hooks but no entry point would never be called."""
    import ast
    import importlib.metadata as md

    registered = {ep.value for ep in md.entry_points(group="llmzoo") if ep.value.startswith("llmzoo_plugins")}
    with_hooks = set()
    for path in (ROOT / "plugins").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("llmzoo_") and any(
                    "hookimpl" in ast.unparse(d) for d in node.decorator_list):
                with_hooks.add("llmzoo_plugins" if path.stem == "__init__" else f"llmzoo_plugins.{path.stem}")
    assert registered == with_hooks, (f"entry points without hooks: {sorted(registered - with_hooks)}; "
                                      f"modules with hooks and no entry point: {sorted(with_hooks - registered)}")
