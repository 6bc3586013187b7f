"""What README.md tells a user who just cloned the repository, checked against the code:
its python snippets run (or, where they need a model or a package too heavy for this tier,
name only what exists), every environment variable the code reads is documented and every
documented one is read, and neither README.md nor BENCHMARKS.md links outside the repository
or names a file that is not there.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = {"README.md": README, "BENCHMARKS.md": (ROOT / "BENCHMARKS.md").read_text()}
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)

# The names a snippet leaves to the reader, keyed by a line that identifies the snippet, and a check
# of what it computed.  A snippet without an entry here or in ELSEWHERE fails test_every_snippet_is_covered.
SETUP = {
    "crossent.cross_entropy_with_stats(": (
        "logits = torch.randn(8, 10, requires_grad=True); target = torch.randint(0, 10, (8,)); w = torch.rand(10)",
        "assert out.loss.shape == () and out.lse.shape == (8,) and out.z_loss > 0\n"
        "crit.load_state_dict(torch.nn.CrossEntropyLoss(weight=torch.rand(10)).state_dict())\n"
        "torch.testing.assert_close(crit(logits, target), F.cross_entropy(logits, target, weight=crit.weight))"),
    "crossent.linear_log_probs(hidden, lm_head.weight": (
        "hidden = torch.randn(16, 8, requires_grad=True); lm_head = torch.nn.Linear(8, 50, bias=False)\n"
        "tokens = torch.randint(0, 50, (16,)); tokens[:4] = -100; mask = (tokens != -100).float()\n"
        "old_log_probs = torch.randn(16) - 4; adv = torch.randn(16)",
        "ref = F.log_softmax(lm_head(hidden).float() / 0.7, -1).gather(-1, tokens.clamp(min=0)[:, None])[:, 0]\n"
        "torch.testing.assert_close(out.log_probs, ref * mask)\n"
        "assert hidden.grad is not None and lm_head.weight.grad is not None"),
    "vocab_parallel_cross_entropy(logits_shard, target, group=tp_group)": (
        "tp_group = None; logits_shard = torch.randn(6, 11, requires_grad=True); target = torch.randint(0, 11, (6,))\n"
        "hidden = torch.randn(6, 4); weight_shard = torch.randn(11, 4)",
        "torch.testing.assert_close(loss, F.cross_entropy(hidden @ weight_shard.T, target))"),
    "loss = crossent.cross_entropy(logits, target, label_smoothing=0.1, z_loss=1e-4)\n": (
        "import crossent\nfrom torch.distributed.device_mesh import init_device_mesh\n"
        "from torch.distributed.tensor import Shard, distribute_tensor\n"
        "mesh = init_device_mesh('cpu', (1,)); full = torch.randn(6, 11); target = torch.randint(0, 11, (6,))\n"
        "model = lambda x: distribute_tensor(full, mesh, [Shard(1)]); x = None\n"
        "hidden = torch.randn(6, 4); lm_head = torch.nn.Linear(4, 11, bias=False)\n"
        "W = lm_head.weight.detach(); lm_head.weight = torch.nn.Parameter(distribute_tensor(W, mesh, [Shard(0)]))",
        "assert type(loss).__name__ == 'DTensor'\n"
        "torch.testing.assert_close(loss.full_tensor(), F.cross_entropy(hidden @ W.T, target))"),
}
# Snippets that need a model, a Trainer or an integration package (seconds to tens of seconds to
# import): their own test files run them; here only their `from crossent... import` lines are checked.
ELSEWHERE = {
    "from crossent.distributed.torchtitan import": "tests/test_integrations_dist.py",
    "from crossent.distributed.megatron import": "tests/test_integrations_dist.py",
    "from crossent.transformers import use_crossent, causal_lm_compute_loss": "tests/test_transformers.py",
    "model = use_crossent(model, fused=True)\nfor batch in loader": "tests/test_transformers.py",
}


def _key(block: str, table) -> str | None:
    keys = [k for k in table if k in block]
    assert len(keys) <= 1, keys
    return keys[0] if keys else None


def test_every_snippet_is_covered():
    assert len(BLOCKS) == len(SETUP) + len(ELSEWHERE)
    for block in BLOCKS:
        assert (_key(block, SETUP) is None) != (_key(block, ELSEWHERE) is None), \
            f"README snippet without a setup in tests/test_docs.py:\n{block}"
        ast.parse(block)


@pytest.fixture
def world_of_one():
    """A one-rank gloo group: the vocab-parallel code paths, their collectives included, in-process
    (the default group of an earlier test in this process, if one set it up: it is one rank too)."""
    import torch.distributed as dist
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if dist.is_initialized():
        assert dist.get_world_size() == 1
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("key", list(SETUP), ids=lambda k: re.sub(r"\W+", "_", k).strip("_")[:40])
def test_snippet_runs(key, request):
    (block,) = [b for b in BLOCKS if key in b]
    setup, check = SETUP[key]
    if "distribute_tensor" in setup and not hasattr(pytest.importorskip("torch.distributed.tensor"), "Shard"):
        pytest.skip("torch < 2.5 has no public DTensor API (torch.distributed.tensor)")
    if "tp_group" in setup or "init_device_mesh" in setup:
        request.getfixturevalue("world_of_one")
    ns = {"torch": torch, "F": F}
    exec(compile(setup + "\n" + block + "\n" + check, f"README snippet {key!r}", "exec"), ns)


@pytest.mark.parametrize("key", list(ELSEWHERE), ids=lambda k: re.sub(r"\W+", "_", k).strip("_")[:40])
def test_snippet_imports_exist(key):
    """The crossent names the heavier snippets import are defined in the modules they name."""
    (block,) = [b for b in BLOCKS if key in b]
    imports = [n for n in ast.walk(ast.parse(block)) if isinstance(n, ast.ImportFrom)
               and n.module.startswith("crossent")]
    assert imports or "use_crossent(" in block
    for node in imports:
        path = ROOT / "src" / Path(*node.module.split("."))
        src = (path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).read_text()
        defined = {n.name for n in ast.parse(src).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        for alias in node.names:
            assert alias.name in defined, f"{node.module} has no {alias.name}"
    assert (ROOT / ELSEWHERE[key]).is_file()


def _env_vars(text: str) -> set[str]:
    return set(re.findall(r"\bCROSSENT_[A-Z][A-Z_]*[A-Z]\b", text))


def test_environment_variables_documented():
    """Every CROSSENT_* variable the library, tests, benchmarks or CI read is in README's
    "Environment variables" section, and that section names no other."""
    section = README.split("\n## Environment variables\n", 1)[1].split("\n## ", 1)[0]
    files = [p for d in ("src", "tests", "benchmarks") for p in (ROOT / d).rglob("*.py")]
    files += [ROOT / ".ci" / "run", *(ROOT / "benchmarks").glob("*.sh")]
    read = set().union(*(_env_vars(p.read_text()) for p in files))
    assert len(read) >= 8
    assert read == _env_vars(section), (read - _env_vars(section), _env_vars(section) - read)


def test_chunk_bytes_bad_value_names_the_variable(monkeypatch):
    """A bad CROSSENT_CHUNK_BYTES raises ValueError naming it, not int()'s bare message."""
    import importlib

    import crossent.backends.torch_chunked as tc
    monkeypatch.setenv("CROSSENT_CHUNK_BYTES", "32MiB")
    with pytest.raises(ValueError, match="CROSSENT_CHUNK_BYTES must be a whole number of bytes, got '32MiB'"):
        importlib.reload(tc)
    monkeypatch.delenv("CROSSENT_CHUNK_BYTES")
    importlib.reload(tc)   # leave the module as the other tests found it
    assert tc._CHUNK_BYTES == 32 << 20


@pytest.mark.parametrize("name", list(DOCS))
def test_no_links_outside_the_repository(name):
    text = DOCS[name]
    assert not re.search(r"https?://", text)
    assert "../" not in text and "shared/" not in text
    prose = re.sub(r"`[^`\n]*`", "", text)   # `kernel[grid](...)` is code, not a link
    for target in re.findall(r"\]\(([^)]+)\)", prose):
        assert (ROOT / target.split("#")[0]).exists(), target


@pytest.mark.parametrize("name", list(DOCS))
def test_named_files_exist(name):
    """Paths in backticks (`tests/test_parity.py`, `backends/triton/_launch.py`) exist, from the
    repository root or from src/crossent."""
    paths = set(re.findall(r"`([\w./-]+/[\w.-]+\.(?:py|sh|md|toml))\b", DOCS[name]))
    paths |= {p for cmd in re.findall(r"`(?:python|bash|pytest)[^`]*`", DOCS[name])
              for p in re.findall(r"[\w./-]+/[\w.-]+\.(?:py|sh)\b", cmd)}
    assert len(paths) >= 5
    paths |= {f"tests/{t}" for t in re.findall(r"`(test_\w+\.py)\b", DOCS[name])}   # the test tiers' bare names
    theirs = ("/tmp/", "torch/")   # a scratch script, torch's own files
    missing = [p for p in paths if not any((base / p).exists() for base in (ROOT, ROOT / "src" / "crossent"))
               and not p.startswith(theirs)]
    assert not missing, missing


def test_named_tests_exist():
    """The tests the docs name (`test_parity.py::test_x`, or in README a bare `test_y` after such a
    file in the same sentence) are defined: in that file, or for a bare name in some file under tests/."""
    defs = {p.relative_to(ROOT / "tests").as_posix(): set(re.findall(r"^def (test_\w+)", p.read_text(), re.M))
            for p in (ROOT / "tests").rglob("test_*.py")}
    qualified = re.findall(r"`(?:tests/)?([\w/]+\.py)::(test_\w+)`", "\n".join(DOCS.values()))
    bare = set(re.findall(r"`(test_\w+)`", README))
    assert len(qualified) >= 10 and bare
    missing = [f"{f}::{t}" for f, t in qualified if t not in defs.get(f, ())]
    missing += [t for t in bare if not any(t in names for names in defs.values())]
    assert not missing, missing


@pytest.mark.parametrize("fn", ["cross_entropy", "linear_cross_entropy"])
@pytest.mark.parametrize("cap", [float("inf"), 0.0, -1.0, float("nan")])
def test_softcap_outside_the_documented_formula_raises(fn, cap):
    """README: softcap applies `softcap * tanh(x / softcap)`, which has no value at softcap = inf
    (inf * 0 made the loss NaN): a positive finite number or None, else ValueError."""
    import crossent
    x, t = torch.randn(4, 6), torch.tensor([0, 1, 2, 3])
    args = (x, t) if fn == "cross_entropy" else (x, torch.randn(5, 6), t)
    with pytest.raises(ValueError, match="softcap must be a positive finite number or None"):
        getattr(crossent, fn)(*args, softcap=cap)
    assert getattr(crossent, fn)(*args, softcap=30.0).isfinite()


def test_triton_extra_never_fights_the_triton_torch_pins():
    """pyproject's `triton` extra is satisfied by the Triton the installed torch pins (its CUDA
    wheels pin one exactly: torch 2.4.1 triton==3.0.0, 2.11 3.6.0), so installing the extra never
    makes pip replace the user's torch; the backend's own floor (MIN_TRITON) is the README's."""
    tomllib = pytest.importorskip("tomllib")   # Python >= 3.11
    import importlib.metadata

    from packaging.requirements import Requirement
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["triton"]
    (req,) = map(Requirement, extra)
    assert req.name == "triton"
    pins = [Requirement(r) for r in importlib.metadata.requires("torch") or []]
    for pin in (p for p in pins if p.name == "triton"):
        for spec in pin.specifier:
            if spec.operator == "==":
                assert req.specifier.contains(spec.version), (str(req), str(pin))
    assert req.specifier.contains("3.0.0")   # what torch 2.4 (pyproject's floor) pins
    # (read, not imported: the backend imports triton and its kernels)
    src = (ROOT / "src" / "crossent" / "backends" / "triton" / "__init__.py").read_text()
    major, minor = re.search(r"^MIN_TRITON = \((\d+), (\d+)\)$", src, re.M).groups()
    assert f"Triton >= {major}.{minor}" in README


@pytest.mark.parametrize("name", list(DOCS))
def test_no_internal_issue_numbers(name):
    """Readers of a clone have no issue tracker: a target is named by what it is ("the GPU
    cross-entropy targets (1.2x the floor, ...)"), not as "issue 10's".  Another project's issue,
    named with its repository ("triton-lang/triton issue 9171"), is fine."""
    text = DOCS[name]
    ours = [m[0] for m in re.finditer(r"\bissues?\s+#?\d+", text, re.I)
            if not re.search(r"[\w.-]+/[\w.-]+\s+$", text[:m.start()])]
    assert not ours, ours
