"""AMI publication against a moto server on loopback: blocks, checksums, resume, launch.

moto stores EBS blocks but checks neither sizes nor checksums and ignores most
of RegisterImage, so the tests read every block back and compare it with the
raw disk, and look at the RegisterImage request as it left the client.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

import pytest
from botocore.exceptions import EndpointConnectionError
from moto.moto_server.threaded_moto_server import ThreadedMotoServer

from tether.image import ami, ebsupload
from tether.image.ebsupload import BLOCK_SIZE
from tether.image.errors import BuildError

MIB = 1024 * 1024
DISK_BYTES = 40 * MIB + 64 * 1024  # not a whole number of blocks: the last one is padded
DATA_BLOCKS = {0, 1, 7, 8, 9, 33, 80}  # 80 is the short last block
ZERO_WRITTEN_BLOCK = 20  # allocated on disk but all zero: must be skipped too


@pytest.fixture(scope="module")
def endpoint():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws(endpoint, monkeypatch):
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_REGION": "eu-central-1"}.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    return ami.Aws.from_environment(endpoint_url=endpoint, workers=4)


def _block(index: int) -> bytes:
    return hashlib.sha256(str(index).encode()).digest() * (BLOCK_SIZE // 32)


@pytest.fixture
def image_dir(tmp_path) -> Path:
    """images/<name>/ with a sparse raw disk and the manifest fields publish reads."""
    name = f"img-{tmp_path.name[-12:]}".replace("_", "-")
    out = tmp_path / "images" / name
    out.mkdir(parents=True)
    with open(out / f"{name}.raw", "wb") as raw:
        raw.truncate(DISK_BYTES)
        for index in DATA_BLOCKS:
            raw.seek(index * BLOCK_SIZE)
            raw.write(_block(index)[: DISK_BYTES - index * BLOCK_SIZE])
        raw.seek(ZERO_WRITTEN_BLOCK * BLOCK_SIZE)
        raw.write(bytes(BLOCK_SIZE))
    (out / "manifest.json").write_text(json.dumps(
        {"name": name, "image_id": "7d0c9a0e-image", "key_fingerprint": "ab" * 32}))
    return out


def _raw_block(raw: Path, index: int) -> bytes:
    with open(raw, "rb") as handle:
        handle.seek(index * BLOCK_SIZE)
        return handle.read(BLOCK_SIZE).ljust(BLOCK_SIZE, b"\0")


def _count_puts(client) -> list[int]:
    sent: list[int] = []
    client.meta.events.register("provide-client-params.ebs.PutSnapshotBlock",
                                lambda params, **_: sent.append(params["BlockIndex"]))
    return sent


def test_publish_uploads_exactly_the_data_blocks(aws, image_dir):
    record = ami.publish(aws, image_dir, workers=4, progress=None)
    raw = image_dir / f"{image_dir.name}.raw"
    listed = aws.ebs.list_snapshot_blocks(SnapshotId=record["snapshot_id"])
    assert {b["BlockIndex"] for b in listed["Blocks"]} == DATA_BLOCKS
    for block in listed["Blocks"]:
        got = aws.ebs.get_snapshot_block(SnapshotId=record["snapshot_id"],
                                         BlockIndex=block["BlockIndex"],
                                         BlockToken=block["BlockToken"])
        data = got["BlockData"].read()
        expected = _raw_block(raw, block["BlockIndex"])
        assert len(data) == BLOCK_SIZE == got["DataLength"]
        assert hashlib.sha256(data).digest() == hashlib.sha256(expected).digest()
        assert base64.b64decode(got["Checksum"]) == hashlib.sha256(data).digest()
        assert got["ChecksumAlgorithm"] == "SHA256"
    upload = record["upload"]
    total = -(-DISK_BYTES // BLOCK_SIZE)
    assert upload["total_blocks"] == total
    assert upload["sent_blocks"] == len(DATA_BLOCKS)
    assert upload["zero_blocks"] == total - len(DATA_BLOCKS)
    assert json.loads((image_dir / "ami.json").read_text()) == record


def test_ami_attributes_and_tags(aws, image_dir):
    requests: list[dict] = []
    aws.ec2.meta.events.register("provide-client-params.ec2.RegisterImage",
                                 lambda params, **_: requests.append(dict(params)))
    record = ami.publish(aws, image_dir, workers=2, progress=None)
    (params,) = requests
    assert params["Architecture"] == "x86_64"
    assert params["VirtualizationType"] == "hvm"
    assert params["EnaSupport"] is True
    assert params["BootMode"] == "legacy-bios"
    assert params["RootDeviceName"] == "/dev/xvda"
    (mapping,) = params["BlockDeviceMappings"]
    assert mapping["DeviceName"] == "/dev/xvda"
    assert mapping["Ebs"] == {"SnapshotId": record["snapshot_id"], "VolumeSize": 1,
                              "VolumeType": "gp3", "DeleteOnTermination": True}
    (image,) = aws.ec2.describe_images(ImageIds=[record["image_id"]])["Images"]
    assert image["Name"] == image_dir.name
    tags = {t["Key"]: t["Value"] for t in image["Tags"]}
    assert tags[ami.TAG_IMAGE_ID] == "7d0c9a0e-image"
    assert tags[ami.TAG_FINGERPRINT] == "ab" * 32
    (snap,) = aws.ec2.describe_snapshots(SnapshotIds=[record["snapshot_id"]])["Snapshots"]
    assert {t["Key"]: t["Value"] for t in snap["Tags"]}[ami.TAG_IMAGE_ID] == "7d0c9a0e-image"


def test_register_params_for_the_appliance_disk():
    params = ami.register_params("x", "snap-1", 16 * 1024 ** 3, "d")
    assert params["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"] == 16
    assert ami.register_params("x", "snap-1", 16 * 1024 ** 3 + 1, "d")[
        "BlockDeviceMappings"][0]["Ebs"]["VolumeSize"] == 17


def test_interrupted_upload_resumes_without_resending(aws, image_dir):
    raw = image_dir / f"{image_dir.name}.raw"
    first = _count_puts(aws.ebs)
    fail_after = 3

    def network_down(params, **_):
        if len(first) > fail_after:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1/")

    aws.ebs.meta.events.register("before-call.ebs.PutSnapshotBlock", network_down)
    with pytest.raises(ebsupload.UploadError, match="rerun the same command to resume"):
        ami.publish(aws, image_dir, workers=1, progress=None)
    journal = ebsupload.Journal.load(raw, ebsupload.disk_identity(raw))
    assert journal is not None and not journal.completed
    done_first = set(journal.done)
    assert len(done_first) == fail_after

    aws.ebs.meta.events.unregister("before-call.ebs.PutSnapshotBlock", network_down)
    second = ami.Aws.from_environment(endpoint_url=aws.ebs.meta.endpoint_url, workers=4)
    resent = _count_puts(second.ebs)
    record = ami.publish(second, image_dir, workers=4, progress=None)
    assert record["snapshot_id"] == journal.snapshot_id
    assert len(resent) == len(DATA_BLOCKS) - len(done_first)
    assert set(resent) == DATA_BLOCKS - done_first
    assert record["upload"]["resumed_blocks"] == len(done_first)
    listed = aws.ebs.list_snapshot_blocks(SnapshotId=record["snapshot_id"])["Blocks"]
    assert {b["BlockIndex"] for b in listed} == DATA_BLOCKS

    again = _count_puts(second.ebs)
    assert ami.publish(second, image_dir, progress=None)["image_id"] == record["image_id"]
    assert again == [], "a finished upload is not sent again"


def test_changed_disk_starts_a_new_snapshot(aws, image_dir):
    raw = image_dir / f"{image_dir.name}.raw"
    first = ami.publish(aws, image_dir, progress=None)
    with open(raw, "r+b") as handle:
        handle.seek(50 * BLOCK_SIZE)
        handle.write(b"new data")
    os.utime(raw, ns=(1, 1))
    journal = ebsupload.Journal.load(raw, ebsupload.disk_identity(raw))
    assert journal is None
    stats = ebsupload.SnapshotUploader(aws.ebs, aws.ec2, progress=None).upload(raw)
    assert stats.snapshot_id != first["snapshot_id"]
    assert stats.sent_blocks == len(DATA_BLOCKS) + 1


def test_launch_with_user_data(aws, image_dir):
    record = ami.publish(aws, image_dir, progress=None)
    settings = {"hostname": "conn-1", "home_urls": ["wss://home.example:443/"],
                "proxy": "http://proxy.example:3128", "dns": [], "ntp": ["time.example"]}
    instance_id = ami.launch(aws, record["image_id"], image_dir.name, settings)
    (reservation,) = aws.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    instance = reservation["Instances"][0]
    assert instance["InstanceType"] == "t3.xlarge"
    assert instance["ImageId"] == record["image_id"]
    attr = aws.ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
    data = json.loads(base64.b64decode(attr["UserData"]["Value"]))
    assert data == {"tether": {"hostname": "conn-1", "home_urls": ["wss://home.example:443/"],
                               "proxy": "http://proxy.example:3128", "ntp": ["time.example"]}}


def test_launch_refuses_small_instance_type(aws, image_dir):
    with pytest.raises(BuildError, match="needs 4 vCPU"):
        ami.check_instance_type(aws.ec2, "t3.large")
    ami.check_instance_type(aws.ec2, "m5.xlarge")


def test_launch_refuses_xen_instance_types(aws, image_dir):
    """t2.xlarge has 4 vCPU and 16 GiB, but Xen's disk driver is not built into the kernel."""
    with pytest.raises(BuildError, match="Xen"):
        ami.check_instance_type(aws.ec2, "t2.xlarge")


def test_cli_publish_and_launch(aws, image_dir, capsys):
    base = ["--images-dir", str(image_dir.parent), "--endpoint-url",
            aws.ebs.meta.endpoint_url]
    assert ami.main(base + ["publish", "--name", image_dir.name, "--workers", "2"]) == 0
    assert "AMI ami-" in capsys.readouterr().out
    assert ami.main(base + ["launch", "--name", image_dir.name, "--home-url",
                            "wss://h.example/"]) == 0
    assert "instance i-" in capsys.readouterr().out
    assert ami.main(base + ["launch", "--name", "never-built"]) == 1
    assert "make ami NAME=never-built" in capsys.readouterr().err


def test_publisher_validates_its_own_requests():
    data = _block(1)
    good = {"SnapshotId": "snap-1", "BlockIndex": 3, "BlockData": data,
            "DataLength": BLOCK_SIZE, "Checksum": ebsupload.block_checksum(data),
            "ChecksumAlgorithm": "SHA256"}
    ebsupload.validate_put(good, volume_blocks=2048)
    for bad in ({"BlockData": data[:-1]}, {"DataLength": 4096}, {"BlockIndex": 2048},
                {"Checksum": ebsupload.block_checksum(_block(2))}):
        with pytest.raises(ebsupload.UploadError):
            ebsupload.validate_put({**good, **bad}, volume_blocks=2048)
    done = {5: ebsupload.block_checksum(_block(5)), 1: ebsupload.block_checksum(_block(1))}
    expected = base64.b64encode(hashlib.sha256(
        hashlib.sha256(_block(1)).digest() + hashlib.sha256(_block(5)).digest()).digest()).decode()
    assert ebsupload.aggregate_checksum(done) == expected
    with pytest.raises(ebsupload.UploadError, match="ChangedBlocksCount"):
        ebsupload.validate_complete({"ChangedBlocksCount": 1, "Checksum": expected}, done)


def test_missing_region_and_image_say_what_to_do(monkeypatch, tmp_path):
    for key in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(BuildError, match="set AWS_REGION"):
        ami.Aws.from_environment()
