"""A run's outputs on an object store (fake-gcs-server): launch.export to a gs:// --out,
load_pretrained("gs://..."), launch.eval and launch.browse on a workdir in a bucket, each
against the same done locally."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from data_utils import TINY_TRAIN, write_dataset

from launch import eval as eval_cli
from launch import export as export_cli
from launch import train as train_cli
from launch.cli import missing_workdir
from sae_jax import export as export_module
from sae_jax import load_pretrained, storage
from sae_jax.export import CONFIG

TINY = [*TINY_TRAIN, "--gin.SYNTH_FEATURES=64", "--gin.STEPS=10"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished tiny synthetic run (one checkpoint, config.gin, metrics), exported."""
    workdir = tmp_path_factory.mktemp("outputs") / "run"
    assert train_cli.main([f"--workdir={workdir}", *TINY]) == 0
    if not (workdir / "export" / CONFIG).exists():
        assert export_cli.main([f"--workdir={workdir}"]) == 0
    return workdir


def url_files(url: str) -> dict[str, bytes]:
    """{relative name: bytes} of every object under url."""
    fs, root = storage.filesystem(url)
    fs.invalidate_cache()
    names = fs.find(root)
    return {name[len(root) + 1 :]: fs.cat_file(name) for name in names}


def local_files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}  # fmt: skip


def upload_run(run: Path, url: str) -> None:
    """The run directory in the bucket, each checkpoint step marked committed as orbax marks
    one it writes to gs:// itself (a step without the marker is not listed there)."""
    storage.upload_tree(run, url)
    for step in (run / "checkpoints").iterdir():
        if step.name.isdigit():
            storage.write_atomic(f"{url}/checkpoints/{step.name}/commit_success.txt", "ok\n")


@pytest.mark.parametrize(
    "extra",
    [[], ["--max_file_bytes=5000"], ["--format=saelens"]],
    ids=["single", "sharded", "saelens"],
)
def test_export_to_a_url_equals_the_local_export(run, bucket, tmp_path, extra):
    local = tmp_path / "out"
    assert export_cli.main([f"--workdir={run}", f"--out={local}", *extra]) == 0
    assert export_cli.main([f"--workdir={run}", f"--out={bucket}/out", *extra]) == 0
    files = local_files(local)
    assert len(files) >= (3 if "--max_file_bytes=5000" in extra else 2)
    assert url_files(f"{bucket}/out") == files


def test_export_over_another_form_at_a_url_leaves_only_the_new_files(run, bucket, tmp_path):
    assert (
        export_cli.main([f"--workdir={run}", f"--out={bucket}/out", "--max_file_bytes=5000"]) == 0
    )
    assert len(url_files(f"{bucket}/out")) > 3
    assert export_cli.main([f"--workdir={run}", f"--out={bucket}/out"]) == 0
    assert export_cli.main([f"--workdir={run}", f"--out={tmp_path / 'out'}"]) == 0
    assert url_files(f"{bucket}/out") == local_files(tmp_path / "out")


def test_a_failed_upload_leaves_nothing_that_loads(run, bucket, monkeypatch, capsys):
    """Re-exporting over a complete export at a URL, the upload of the second tensor file
    fails: the URL then holds no cfg.json, so no mix of old and new files loads."""
    url = f"{bucket}/out"
    assert export_cli.main([f"--workdir={run}", f"--out={url}", "--max_file_bytes=5000"]) == 0
    assert load_pretrained(url).cfg.num_experts == 4
    real, calls = export_module._save, []

    def failing(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("upload cut off")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(export_module, "_save", failing)
    with pytest.raises(OSError, match="upload cut off"):
        export_cli.main([f"--workdir={run}", f"--out={url}", "--max_file_bytes=5000"])
    assert CONFIG not in url_files(url) and any(n.endswith(".safetensors") for n in url_files(url))
    with pytest.raises(FileNotFoundError, match=f"{url}/cfg.json: no such file"):
        load_pretrained(url)


def test_load_pretrained_from_a_url_equals_the_local_load(run, bucket):
    x = np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32)
    local = load_pretrained(run / "export")
    storage.upload_tree(run / "export", f"{bucket}/run/export")
    storage.write_atomic(f"{bucket}/run/checkpoints/10/x", "")
    for url in (f"{bucket}/run/export", f"{bucket}/run"):  # a run directory loads its export
        remote = load_pretrained(url)
        assert remote.path == f"{bucket}/run/export" and remote.meta == local.meta
        assert remote.params.keys() == local.params.keys()
        for name, value in local.params.items():
            np.testing.assert_array_equal(np.asarray(remote.params[name]), np.asarray(value))
        codes, want = remote.encode(x), local.encode(x)
        for got, expected in zip(codes, want, strict=True):
            if expected is not None:
                np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
        np.testing.assert_array_equal(np.asarray(remote.decode(codes)), np.asarray(local(x)))


def test_load_pretrained_from_a_sharded_and_a_saelens_export_at_urls(run, bucket, tmp_path):
    x = np.random.default_rng(1).normal(size=(50, 16)).astype(np.float32)
    want = np.asarray(load_pretrained(run / "export")(x))
    for name, extra in (("sharded", "--max_file_bytes=5000"), ("saelens", "--format=saelens")):
        assert export_cli.main([f"--workdir={run}", f"--out={bucket}/{name}", extra]) == 0
        got = np.asarray(load_pretrained(f"{bucket}/{name}")(x))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_one_line_errors_for_urls(bucket, capsys):
    with pytest.raises(FileNotFoundError, match=f"^{bucket}/none: no such directory$"):
        load_pretrained(f"{bucket}/none")
    storage.write_atomic(f"{bucket}/half/sae-00001-of-00002.safetensors", b"x")
    with pytest.raises(FileNotFoundError) as e:
        load_pretrained(f"{bucket}/half")
    assert str(e.value).startswith(f"{bucket}/half/cfg.json: no such file; {bucket}/half is not")
    assert "\n" not in str(e.value)
    assert missing_workdir(f"{bucket}/empty")
    assert capsys.readouterr().err == f"error: {bucket}/empty: nothing there (no object under it)\n"
    assert eval_cli.main(["--workdir", f"{bucket}/empty"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not missing_workdir(f"{bucket}/half") and not missing_workdir(bucket + "/half/")
    assert missing_workdir(f"{bucket}/hal")  # a prefix of a name is not a directory


def test_eval_of_a_workdir_in_a_bucket_writes_the_local_numbers_there(
    run, bucket, tmp_path, capsys
):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    url = f"{bucket}/run"
    upload_run(run, url)
    args = ["--tokens", "512", "--batch_size", "256"]
    assert eval_cli.main(["--workdir", str(copy), *args]) == 0
    assert eval_cli.main(["--workdir", url, *args]) == 0
    out = capsys.readouterr().out
    for name in ("eval.json", "training_curves.png", "expert_load.png", "latent_frequency.png"):
        assert f"wrote {url}/{name}" in out
    files = url_files(url)
    assert json.loads(files["eval.json"]) == json.loads((copy / "eval.json").read_text())
    assert files["eval.json"] == (copy / "eval.json").read_bytes()
    for name in ("training_curves.png", "expert_load.png", "latent_frequency.png"):
        assert len(files[name]) > 5000
    assert not Path("gs:").exists()  # nothing written to a local look-alike of the URL


def test_browse_writes_its_pages_into_a_bucket(run, bucket, tmp_path):
    from sae_jax.browser import build_browser

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    url = f"{bucket}/run"
    upload_run(run, url)
    storage.write_atomic(f"{url}/browser/stale.js", "old")
    options = {"tokens": 512, "batch_size": 256, "log": lambda _: None}
    index, _ = build_browser(copy, **options)
    remote, _ = build_browser(url, **options)
    assert str(remote) == f"{url}/browser/index.html"
    pages = url_files(f"{url}/browser")
    assert pages == local_files(index.parent)


def test_eval_of_an_sae_at_a_url_writes_to_an_out_url(run, bucket, tmp_path, capsys):
    """launch.eval --sae URL --out URL (local shards): the local run's numbers, in the bucket."""
    write_dataset(tmp_path / "eval", [512], d=16, outliers=2, seed=1, ids=False)
    storage.upload_tree(run / "export", f"{bucket}/sae")
    args = ["--data", str(tmp_path / "eval"), "--batch_size", "256", "--no_plots"]
    assert eval_cli.main(["--sae", str(run / "export"), "--out", str(tmp_path / "o"), *args]) == 0
    assert eval_cli.main(["--sae", f"{bucket}/sae", "--out", f"{bucket}/o", *args]) == 0
    assert f"wrote {bucket}/o/eval.json" in capsys.readouterr().out
    got = json.loads(url_files(f"{bucket}/o")["eval.json"])
    assert got == json.loads((tmp_path / "o" / "eval.json").read_text())
    assert got["tokens"] == 512 and got["outlier_fraction"] > 0
