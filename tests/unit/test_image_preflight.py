"""Bad input to the build: clear errors before anything is touched."""

import os
from collections import namedtuple

import pytest

from tether.image import build, preflight
from tether.image.errors import BuildError


def test_not_root_says_to_use_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(BuildError, match="needs root"):
        preflight.check_root()


def test_unwritable_images_dir(tmp_path):
    blocker = tmp_path / "images"
    blocker.write_text("a file where the directory should be")
    with pytest.raises(BuildError, match="not writable"):
        preflight.check_writable(blocker / "sub")


def test_full_disk_names_free_and_needed_space(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: usage(100, 99, 2 * 1024**3))
    with pytest.raises(BuildError, match=r"only 2\.0 GiB free .* needs 8 GiB"):
        preflight.check_free_space(tmp_path)


def test_missing_tool_names_the_debian_package(monkeypatch):
    monkeypatch.setattr(preflight, "TOOLS", {"no-such-tool-xyz": "some-package"})
    with pytest.raises(BuildError, match="install the Debian package 'some-package'"):
        preflight.check_tools()


@pytest.mark.parametrize("name", ["UPPER", "-dash", "a/b", "x" * 64, ""])
def test_bad_image_names(name):
    with pytest.raises(BuildError, match="image name"):
        build.check_name(name)


def test_default_names_are_valid_and_unique():
    names = {build.default_name() for _ in range(20)}
    assert len(names) > 1
    for name in names:
        assert build.check_name(name) == name


def test_existing_image_is_not_overwritten(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, "run_all", lambda images: None)
    (tmp_path / "img1").mkdir()
    with pytest.raises(BuildError, match="exists already"):
        build.run(build.Options(images_dir=tmp_path, name="img1"))
