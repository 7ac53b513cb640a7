import subprocess
import sys

from PIL import Image

from sdserve.engine import infotext


def sdserve(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "sdserve.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_generate_writes_png_with_infotext_deterministically(tmp_path, models_dir):
    common = ["--steps", "4", "--width", "64", "--height", "64", "--seed", "1", "--models-dir", str(models_dir),
              "--data-dir", str(tmp_path / "data"), "--model", "tiny"]
    first = sdserve("generate", "a red circle", "-o", "x.png", *common, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "seed 1" in first.stderr and "x.png" in first.stdout
    second = sdserve("generate", "a red circle", "-o", "y.png", *common, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    x, y = Image.open(tmp_path / "x.png"), Image.open(tmp_path / "y.png")
    assert x.size == (64, 64)
    assert x.tobytes() == y.tobytes()
    params = infotext.parse(x.info["parameters"])
    assert params["Prompt"] == "a red circle"
    assert (params["Steps"], params["Seed"], params["Size-1"], params["Size-2"], params["Model"]) == \
        ("4", "1", "64", "64", "tiny")


def test_generate_bad_sampler_exits_with_message(tmp_path, models_dir):
    out = sdserve("generate", "x", "--sampler", "Euler b", "--models-dir", str(models_dir),
                  "--data-dir", str(tmp_path), "--model", "tiny", cwd=tmp_path)
    assert out.returncode == 2
    assert "unknown sampler 'Euler b'" in out.stderr


def test_models_lists_kinds_and_hashes(tmp_path, models_dir, registry):
    out = sdserve("models", "--models-dir", str(models_dir), "--data-dir", str(tmp_path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "tinyfile" in out.stdout and "single-file" in out.stdout
    assert registry.short_hash(registry.info("tinyfile")) in out.stdout
    assert "demo" in out.stdout and "demo (shapes)" in out.stdout


def test_every_command_has_help(tmp_path):
    for command in ("generate", "models", "serve"):
        out = sdserve(command, "--help", cwd=tmp_path)
        assert out.returncode == 0 and "Usage" in out.stdout
