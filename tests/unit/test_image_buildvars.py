"""The build-variables file: the contract between the build and the roles."""

import json

import pytest

from tether.image import buildvars
from tether.image.errors import BuildError


def test_variables_match_the_contract_with_absolute_paths(tmp_path, monkeypatch):
    (tmp_path / "wh").mkdir()
    (tmp_path / "cred.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    from pathlib import Path
    v = buildvars.make(Path("wh"), Path("cred.json"), "img1", "1234-uuid")
    assert set(v) == set(buildvars.KEYS) == {
        "tether_wheelhouse", "tether_credential", "tether_image_name", "tether_image_id", "tether_image_version"}
    assert v["tether_wheelhouse"] == str(tmp_path / "wh")
    assert v["tether_credential"] == str(tmp_path / "cred.json")
    out = buildvars.write(tmp_path / "buildvars.json", v)
    assert json.loads(out.read_text()) == v
    assert not list(tmp_path.glob("*.tmp"))


def test_missing_inputs_are_refused(tmp_path):
    with pytest.raises(BuildError, match="wheelhouse"):
        buildvars.make(tmp_path / "nope", tmp_path / "c.json", "n", "i")
    (tmp_path / "wh").mkdir()
    with pytest.raises(BuildError, match="credential"):
        buildvars.make(tmp_path / "wh", tmp_path / "c.json", "n", "i")
    with pytest.raises(BuildError, match="lack"):
        buildvars.write(tmp_path / "b.json", {"tether_image_name": "n"})
