"""Reading the Debian mirror from the host's apt configuration."""

import pytest

from tether.image.mirror import MirrorNotFound, find_mirror


def _apt(tmp_path, sources_list="", **parts):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(sources_list)
    for name, text in parts.items():
        (tmp_path / "sources.list.d" / name.replace("_", ".")).write_text(text)
    return tmp_path


def test_deb822_source(tmp_path):
    apt = _apt(tmp_path, debian_sources=(
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\n"
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\nComponents: main\n"))
    assert find_mirror("bookworm", apt_dir=apt) == "http://mirror.example/debian"


def test_disabled_and_deb_src_stanzas_are_skipped(tmp_path):
    apt = _apt(tmp_path, a_sources=(
        "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\nComponents: main\n\n"
        "Enabled: no\nTypes: deb\nURIs: http://off.example/debian\nSuites: bookworm\nComponents: main\n\n"
        "Types: deb\nURIs: http://on.example/debian\nSuites: bookworm\nComponents: main contrib\n"))
    assert find_mirror("bookworm", apt_dir=apt) == "http://on.example/debian"


def test_one_line_format_with_options(tmp_path):
    apt = _apt(tmp_path, sources_list=(
        "# deb http://commented.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://one.example/debian bookworm main non-free\n"))
    assert find_mirror("bookworm", apt_dir=apt) == "http://one.example/debian"


def test_no_source_for_the_suite_says_what_to_do(tmp_path):
    apt = _apt(tmp_path, sources_list="deb http://one.example/debian bullseye main\n")
    with pytest.raises(MirrorNotFound, match="configure a Debian 12 mirror"):
        find_mirror("bookworm", apt_dir=apt)
