"""`tether-image` / `python -m tether.image.cli`: build and verify images.

    build  [--name N] [--home-state DIR | --credential BUNDLE] [--home-url URL ...]
    verify --name N
    bundle --name N [--home-state DIR] [--version V]

Expected failures (BuildError) print one message that says what to do and
exit 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import build, verify
from .errors import BuildError
from .progress import Progress, fmt_seconds


def _bundle(args) -> int:
    from . import bundle

    image_dir = (args.images_dir / build.check_name(args.name)).resolve()
    if not image_dir.is_dir():
        raise BuildError(f"{image_dir} not found: ls {args.images_dir} for built images")
    keys = _update_keys(args.home_state or args.images_dir / ".home")
    info = bundle.from_image(image_dir, args.name, args.version, keys.signing_cert, keys.signing_key)
    bundle.verify(image_dir / f"{args.name}.raucb", keys.ca_cert)
    print(f"bundle {args.name}.raucb: version {info.version}, {info.compatible}, {info.size} bytes, "
          f"sha256 {info.sha256} (signature checked against the update CA)")
    return 0


def _update_keys(state: Path):
    from tether.home import paths, updatekeys

    home = paths.StatePaths(state.resolve())
    if not home.ca_cert.is_file():
        raise BuildError(f"no home state in {state}: give --home-state DIR of the home whose appliances take the update")
    return updatekeys.ensure(home)


def _build(args) -> int:
    opts = build.Options(images_dir=args.images_dir, name=args.name, home_state=args.home_state,
                         credential=args.credential, home_urls=args.home_urls, verify=not args.no_verify)
    progress = Progress()
    try:
        result = build.run(opts, progress)
    except BuildError:
        if progress.times:
            print("stages before the failure: " + ", ".join(
                f"{k} {fmt_seconds(v)}" for k, v in progress.times.items()), file=sys.stderr)
        raise
    print(build.summary(result))
    return 0


def _verify(args) -> int:
    image_dir = (args.images_dir / build.check_name(args.name)).resolve()
    if not image_dir.is_dir():
        raise BuildError(f"{image_dir} not found: ls {args.images_dir} for built images")
    progress = Progress()
    scratch = image_dir.parent / ".work"
    scratch.mkdir(exist_ok=True)
    with progress.stage("verify", f"image checks on {image_dir}"):
        verify.check(image_dir, scratch / f"verify-{args.name}.xml", say=progress.say)
    print(f"image {args.name}: all checks passed")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tether-image", description="tether appliance images")
    parser.add_argument("--images-dir", type=Path, default=build.CHECKOUT / "images",
                        help="where images, the cache and the local home state live (default: images/)")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build a verified OVA + raw disk into images/<name>/")
    b.set_defaults(func=_build)
    b.add_argument("--name", help="image name (default: tether-<UTC time>-<random>)")
    src = b.add_mutually_exclusive_group()
    src.add_argument("--home-state", type=Path, help="home state directory to issue the credential (default: images/.home)")
    src.add_argument("--credential", type=Path, help="credential bundle from `tether-home image issue`")
    b.add_argument("--home-url", action="append", default=[], dest="home_urls",
                   help="wss:// URL of home recorded in the image (repeatable; default: a placeholder)")
    b.add_argument("--no-verify", action="store_true", help="skip the image checks (development only)")
    v = sub.add_parser("verify", help="run the image checks on images/<name>/")
    v.set_defaults(func=_verify)
    v.add_argument("--name", required=True)
    u = sub.add_parser("bundle", help="write images/<name>/<name>.raucb, the signed update bundle of that image")
    u.set_defaults(func=_bundle)
    u.add_argument("--name", required=True)
    u.add_argument("--home-state", type=Path, help="home state directory with the update key (default: images/.home)")
    u.add_argument("--version", help="bundle version (default: the image's version from its manifest)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except BuildError as exc:
        print(f"\ntether-image: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ntether-image: interrupted; scratch was cleaned up, rerun the same command", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
