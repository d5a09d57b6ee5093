"""The wheelhouse: wheels for the guest's Python, dependencies cached by their set."""

import sys
from pathlib import Path

from tether.image import wheelhouse

CHECKOUT = Path(__file__).resolve().parents[2]


def test_runtime_requirements_come_from_pyproject():
    names = {r.split(">")[0].split("=")[0].strip() for r in wheelhouse.runtime_requirements(CHECKOUT / "pyproject.toml")}
    assert {"websockets", "cryptography", "psutil"} <= names


def test_requirements_without_dependencies_are_refused(tmp_path):
    import pytest
    from tether.image.errors import BuildError

    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    with pytest.raises(BuildError, match="no \\[project\\] dependencies"):
        wheelhouse.runtime_requirements(tmp_path / "pyproject.toml")


def test_download_targets_the_guest_interpreter(tmp_path):
    args = wheelhouse.download_args(["psutil>=5.9"], tmp_path)
    assert args[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--only-binary=:all:" in args
    assert args[args.index("--python-version") + 1] == "3.11"
    assert "manylinux2014_x86_64" in args and args[-1] == "psutil>=5.9"


def test_cache_key_follows_the_requirements():
    assert wheelhouse.deps_key(["a", "b"]) == wheelhouse.deps_key(["b", "a"])
    assert wheelhouse.deps_key(["a"]) != wheelhouse.deps_key(["a>=2"])


def test_cached_dependency_wheels_are_reused_without_the_index(tmp_path, monkeypatch):
    reqs = wheelhouse.runtime_requirements(CHECKOUT / "pyproject.toml")
    ready = tmp_path / f"wheels-{wheelhouse.deps_key(reqs)}"
    ready.mkdir()
    (ready / "psutil-7-cp36-abi3-manylinux_2_17_x86_64.whl").write_bytes(b"w")
    calls = []
    real_run = wheelhouse.run

    def fake_run(cmd, what, **kw):
        calls.append(what)
        if "pip download" in what:
            raise AssertionError("the package index must not be asked")
        return real_run(cmd, what=what, **kw)

    monkeypatch.setattr(wheelhouse, "run", fake_run)
    wheels = wheelhouse.build(CHECKOUT, tmp_path / "out", cache=tmp_path, say=lambda _: None)
    names = [w.name for w in wheels]
    assert any(n.startswith("tether_agent-") for n in names) and "psutil-7-cp36-abi3-manylinux_2_17_x86_64.whl" in names
