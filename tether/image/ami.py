"""Publish an image's raw disk as an AMI, and launch it.

`python -m tether.image.ami publish --name NAME` (make ami NAME=...):
upload images/NAME/NAME.raw as an EBS snapshot (tether.image.ebsupload),
register it as an AMI that matches the disk (x86_64, HVM, ENA, legacy BIOS
boot because the disk boots GRUB from its BIOS boot partition, root
/dev/xvda gp3), tag it with the image id and key fingerprint from
manifest.json, and write images/NAME/ami.json.

`python -m tether.image.ami launch --name NAME` (make launch-aws NAME=...):
start one instance of it with 4 vCPU / >= 12 GiB and the first-boot settings
as JSON user data (read by tether.agent.firstboot).

Credentials and region come from the standard AWS environment (AWS_PROFILE,
AWS_ACCESS_KEY_ID, AWS_REGION...); --endpoint-url or AWS_ENDPOINT_URL points
both at an emulator for tests.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, NoRegionError

from tether.atomicfile import write_atomic
from tether.image import manifest as manifest_mod
from tether.image.ebsupload import GIB, SnapshotUploader, UploadStats, volume_gib
from tether.image.errors import BuildError

ROOT_DEVICE = "/dev/xvda"
DEFAULT_INSTANCE_TYPE = "t3.xlarge"
MIN_VCPUS, MIN_MEMORY_MIB = 4, 12 * 1024
TAG_IMAGE_ID, TAG_FINGERPRINT, TAG_NAME = "tether:image-id", "tether:key-fingerprint", "tether:name"
AMI_RECORD = "ami.json"


@dataclass(frozen=True)
class Aws:
    """The two clients publishing needs, made from the standard AWS environment."""

    ebs: object
    ec2: object
    region: str

    @classmethod
    def from_environment(cls, region: str | None = None, endpoint_url: str | None = None,
                         workers: int = 8) -> "Aws":
        # botocore reads AWS_DEFAULT_REGION and the config file; AWS_REGION is
        # what the other SDKs and most CI systems set, so honour it too.
        session = boto3.session.Session(region_name=region or os.environ.get("AWS_REGION"))
        if not session.region_name:
            raise BuildError("no AWS region: set AWS_REGION (or AWS_DEFAULT_REGION, or --region)")
        config = Config(max_pool_connections=max(10, workers * 2),
                        retries={"mode": "standard", "max_attempts": 8})
        endpoint = endpoint_url or None  # None: boto3 honours AWS_ENDPOINT_URL itself
        return cls(session.client("ebs", endpoint_url=endpoint, config=config),
                   session.client("ec2", endpoint_url=endpoint, config=config),
                   session.region_name)


# ------------------------------------------------------------ register


def register_params(name: str, snapshot_id: str, disk_bytes: int, description: str) -> dict:
    """RegisterImage parameters for the appliance disk; validated, since moto ignores them."""
    size_gib = volume_gib(disk_bytes)
    params = {
        "Name": name,
        "Description": description,
        "Architecture": "x86_64",
        "VirtualizationType": "hvm",
        "EnaSupport": True,
        "BootMode": "legacy-bios",
        "ImdsSupport": "v2.0",
        "RootDeviceName": ROOT_DEVICE,
        "BlockDeviceMappings": [{
            "DeviceName": ROOT_DEVICE,
            "Ebs": {"SnapshotId": snapshot_id, "VolumeSize": size_gib, "VolumeType": "gp3",
                    "DeleteOnTermination": True},
        }],
    }
    if size_gib * GIB < disk_bytes:
        raise BuildError(f"internal error: {size_gib} GiB root volume is smaller than the disk")
    return params


def image_tags(name: str, manifest: dict) -> dict[str, str]:
    """Tags that tie the AMI and its snapshot to the image's identity."""
    return {"Name": name, TAG_NAME: name, TAG_IMAGE_ID: manifest["image_id"],
            TAG_FINGERPRINT: manifest["key_fingerprint"]}


def find_image(ec2, name: str) -> str | None:
    """Id of an AMI of ours that already has this name (publishing is rerunnable)."""
    images = ec2.describe_images(Owners=["self"],
                                 Filters=[{"Name": "name", "Values": [name]}])["Images"]
    return images[0]["ImageId"] if images else None


def register(aws: Aws, name: str, snapshot_id: str, disk_bytes: int, tags: dict[str, str],
             description: str) -> str:
    """Register the AMI (or find the one registered before) and tag it and its snapshot."""
    image_id = find_image(aws.ec2, name)
    if image_id is None:
        image_id = aws.ec2.register_image(
            **register_params(name, snapshot_id, disk_bytes, description))["ImageId"]
    # Tagged separately (not TagSpecifications) so a rerun also repairs missing tags.
    aws.ec2.create_tags(Resources=[image_id, snapshot_id],
                        Tags=[{"Key": k, "Value": v} for k, v in tags.items()])
    return image_id


def publish(aws: Aws, image_dir: Path, workers: int = 8,
            progress: TextIO | None = sys.stderr) -> dict:
    """Upload images/<name>/<name>.raw, register the AMI, write ami.json; return the record."""
    image_dir = Path(image_dir)
    name = image_dir.name
    raw = image_dir / f"{name}.raw"
    manifest = manifest_mod.read_manifest(image_dir)
    tags = image_tags(name, manifest)
    description = f"tether identity connector {name} (image {manifest['image_id']})"
    uploader = SnapshotUploader(aws.ebs, aws.ec2, workers=workers, description=description,
                                tags=tags, progress=progress)
    stats = uploader.upload(raw)
    image_id = register(aws, name, stats.snapshot_id, raw.stat().st_size, tags, description)
    record = {"name": name, "region": aws.region, "image_id": image_id,
              "snapshot_id": stats.snapshot_id, "tether_image_id": manifest["image_id"],
              "key_fingerprint": manifest["key_fingerprint"], "upload": _stats_dict(stats)}
    path = image_dir / AMI_RECORD
    write_atomic(path, json.dumps(record, indent=2) + "\n", mode=0o644)
    return record


def _stats_dict(stats: UploadStats) -> dict:
    return {"total_blocks": stats.total_blocks, "sent_blocks": stats.sent_blocks,
            "resumed_blocks": stats.resumed_blocks, "zero_blocks": stats.zero_blocks,
            "seconds": round(stats.seconds, 3)}


# ------------------------------------------------------------ launch


def check_instance_type(ec2, instance_type: str) -> None:
    """Refuse an instance type below the appliance's AWS floor (4 vCPU, 12 GiB), or on Xen.

    The appliance boots without an initramfs: its kernel has NVMe built in (EBS
    on Nitro) but Xen's block driver only as a module, so a Xen-based type
    (t2, m4, ...) would not find its root disk.
    """
    try:
        info = ec2.describe_instance_types(InstanceTypes=[instance_type])["InstanceTypes"]
    except ClientError as exc:
        raise BuildError(f"instance type {instance_type!r} unknown here ({exc}); "
                         f"use e.g. {DEFAULT_INSTANCE_TYPE} or m5.xlarge") from None
    if info[0].get("Hypervisor") == "xen":
        raise BuildError(f"{instance_type} runs on Xen, where the appliance cannot find its root "
                         f"disk (no initramfs, NVMe only): use a Nitro type such as "
                         f"{DEFAULT_INSTANCE_TYPE} or m5.xlarge")
    vcpus = info[0]["VCpuInfo"]["DefaultVCpus"]
    memory = info[0]["MemoryInfo"]["SizeInMiB"]
    if vcpus != MIN_VCPUS or memory < MIN_MEMORY_MIB:
        raise BuildError(f"{instance_type} has {vcpus} vCPU / {memory} MiB; the appliance needs "
                         f"{MIN_VCPUS} vCPU and >= {MIN_MEMORY_MIB} MiB "
                         f"(e.g. {DEFAULT_INSTANCE_TYPE}, m5.xlarge)")


def user_data(settings: dict) -> str:
    """First-boot settings as EC2 user data: {"tether": {...}} (see tether.agent.firstboot)."""
    return json.dumps({"tether": {k: v for k, v in settings.items() if v not in (None, [], "")}},
                      sort_keys=True)


def launch(aws: Aws, image_id: str, name: str, settings: dict,
           instance_type: str = DEFAULT_INSTANCE_TYPE, subnet_id: str | None = None,
           security_group_ids: list[str] | None = None) -> str:
    """Start one instance of the AMI; IMDSv2 only, no key pair (there is no login)."""
    check_instance_type(aws.ec2, instance_type)
    params = {
        "ImageId": image_id, "InstanceType": instance_type, "MinCount": 1, "MaxCount": 1,
        "UserData": user_data(settings),
        "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
        "TagSpecifications": [{"ResourceType": "instance",
                               "Tags": [{"Key": "Name", "Value": name},
                                        {"Key": TAG_NAME, "Value": name}]}],
    }
    if subnet_id:
        params["SubnetId"] = subnet_id
    if security_group_ids:
        params["SecurityGroupIds"] = security_group_ids
    return aws.ec2.run_instances(**params)["Instances"][0]["InstanceId"]


# ------------------------------------------------------------ CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tether.image.ami",
                                     description="Publish an image as an AMI, or launch it.")
    parser.add_argument("--images-dir", type=Path, default=Path("images"))
    parser.add_argument("--region", help="default: AWS_REGION / AWS_DEFAULT_REGION")
    parser.add_argument("--endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL"),
                        help="AWS API endpoint override, e.g. a moto server (AWS_ENDPOINT_URL)")
    sub = parser.add_subparsers(dest="command", required=True)
    pub = sub.add_parser("publish", help="upload images/NAME/NAME.raw and register the AMI")
    pub.add_argument("--name", required=True)
    pub.add_argument("--workers", type=int, default=8, help="parallel block uploads")
    run = sub.add_parser("launch", help="launch the AMI recorded in images/NAME/ami.json")
    run.add_argument("--name", required=True)
    run.add_argument("--ami-id", help="default: image_id from images/NAME/ami.json")
    run.add_argument("--instance-type", default=DEFAULT_INSTANCE_TYPE)
    run.add_argument("--subnet-id")
    run.add_argument("--security-group-id", action="append", default=[])
    run.add_argument("--hostname")
    run.add_argument("--home-url", action="append", default=[], help="repeatable")
    run.add_argument("--proxy", help="http://host:port for the connection home")
    run.add_argument("--dns", action="append", default=[], help="repeatable")
    run.add_argument("--ntp", action="append", default=[], help="repeatable")
    return parser


def _launch_from_args(aws: Aws, args: argparse.Namespace) -> str:
    image_dir = args.images_dir / args.name
    ami_id = args.ami_id
    if not ami_id:
        try:
            ami_id = json.loads((image_dir / AMI_RECORD).read_text())["image_id"]
        except (OSError, ValueError, KeyError):
            raise BuildError(f"no AMI recorded in {image_dir / AMI_RECORD}: run "
                             f"`make ami NAME={args.name}` first, or pass --ami-id") from None
    settings = {"hostname": args.hostname, "home_urls": args.home_url, "proxy": args.proxy,
                "dns": args.dns, "ntp": args.ntp}
    return launch(aws, ami_id, args.name, settings, args.instance_type, args.subnet_id,
                  args.security_group_id)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        aws = Aws.from_environment(args.region, args.endpoint_url,
                                   getattr(args, "workers", 8))
        if args.command == "publish":
            record = publish(aws, args.images_dir / args.name, args.workers)
            print(f"AMI {record['image_id']} (snapshot {record['snapshot_id']}) in "
                  f"{record['region']}; recorded in {args.images_dir / args.name / AMI_RECORD}")
        else:
            print(f"instance {_launch_from_args(aws, args)} starting")
        return 0
    except NoCredentialsError:
        print("error: no AWS credentials: set AWS_PROFILE or AWS_ACCESS_KEY_ID/"
              "AWS_SECRET_ACCESS_KEY", file=sys.stderr)
    except NoRegionError:
        print("error: no AWS region: set AWS_REGION or pass --region", file=sys.stderr)
    except (BuildError, BotoCoreError, ClientError) as exc:
        print(f"error: {exc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
