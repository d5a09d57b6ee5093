"""Turning the image checks' JUnit report into the list the build prints."""

from tether.image import verify

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="4" failures="1" errors="1">
<testcase classname="tests.image.test_image" name="test_agent_enabled"/>
<testcase classname="tests.image.test_image" name="test_no_logs">
  <failure message="AssertionError: logs left in the image: ['/data/log/x']&#10;more">trace</failure>
</testcase>
<testcase classname="tests.image.test_image" name="test_root_locked">
  <error message="fixture failed">trace</error>
</testcase>
<testcase classname="tests.image.test_image" name="test_ova"><skipped message="no ova"/></testcase>
</testsuite></testsuites>"""


def test_failed_and_erroring_checks_are_listed(tmp_path):
    report = tmp_path / "r.xml"
    report.write_text(JUNIT)
    assert verify.failed_checks(report) == [
        "tests.image.test_image::test_no_logs: AssertionError: logs left in the image: ['/data/log/x']",
        "tests.image.test_image::test_root_locked: fixture failed",
    ]


def test_missing_report_means_no_list(tmp_path):
    assert verify.failed_checks(tmp_path / "none.xml") == []


def test_pytest_command_points_at_the_image(tmp_path):
    cmd = verify.pytest_command(tmp_path / "img", tmp_path / "r.xml")
    assert cmd[1:3] == ["-m", "pytest"]
    assert "--image-dir" in cmd and str(tmp_path / "img") in cmd
    assert f"--junitxml={tmp_path / 'r.xml'}" in cmd
