"""The build's wiring: each stage gets the outputs of the stages before it (no qemu, no root)."""

from pathlib import Path

from tether.image import build, stages
from tether.image.basedisk import BaseDisk
from tether.image.progress import Progress


def test_each_stage_is_handed_what_the_stages_before_it_made(tmp_path, monkeypatch):
    calls = {}
    base = BaseDisk(tmp_path / "base.raw", tmp_path / "base.vmlinuz", "k" * 64, cached=True)
    cred = stages.Credential(tmp_path / "credential.json", {"image_id": "id-1", "fingerprint": "fp"})
    layer = stages.Layer(tmp_path / "provisioned.raw", cached=True)
    ova = stages.Ova(tmp_path / "x.ova", "ova-sha", "raw-sha")
    raw = tmp_path / "x.raw"

    def fake(name, result=None):
        def stage(*args):
            calls[name] = args
            return result
        monkeypatch.setattr(stages, name, stage)

    fake("base_disk", base)
    fake("accelerator", "tcg")
    fake("image_credential", cred)
    fake("wheels", tmp_path / "wheelhouse")
    fake("build_vars", tmp_path / "buildvars.json")
    fake("provisioned_layer", layer)
    fake("image_disk", raw)
    fake("sealed")
    fake("ova", ova)
    fake("manifest")
    fake("update_bundle")
    fake("verified")
    dirs = build.BuildDirs(tmp_path / "x", tmp_path / ".partial/x", tmp_path / ".work/x", tmp_path / ".cache")
    opts = build.Options(images_dir=tmp_path, name="x", home_urls=["wss://h/"])
    result = build._pipeline(opts, "x", dirs, Progress())

    assert calls["accelerator"][:2] == (dirs.cache, base.kernel)
    assert calls["image_credential"][:4] == (None, (tmp_path / ".home").resolve(), ["wss://h/"], dirs.work)
    assert calls["build_vars"][:3] == (tmp_path / "wheelhouse", cred, "x")
    assert calls["provisioned_layer"][:2] == (base, tmp_path / "wheelhouse")
    packer = calls["provisioned_layer"][3]
    assert (packer.accelerator, packer.vars_file) == ("tcg", tmp_path / "buildvars.json")
    assert calls["image_disk"][0] == layer and calls["image_disk"][2] is packer
    assert calls["sealed"][0] == raw and calls["ova"][:1] == (raw,)
    image_version = calls["build_vars"][3]
    assert calls["manifest"][:5] == ("x", cred.bundle, raw, ova, image_version)
    assert calls["update_bundle"][:3] == ("x", (tmp_path / ".home").resolve(), dirs.partial)
    assert (result.image_id, result.fingerprint, result.accelerator) == ("id-1", "fp", "tcg")
    assert result.base_cached and result.layer_cached and result.artifacts["ova"] == Path(dirs.final / "x.ova")
