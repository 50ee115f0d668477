"""The Mnemosyne semiotic module on a tiny random checkpoint (both towers) and real image files."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from capibara_export.semiotic import (MnemosyneSemioModule, SemioticError, SemioticInteraction, Thresholds,
                                      profile_usage)
from capibara_export.semiotic.codes import CodesError
from capibara_export.semiotic.pipeline import ImagePipeline
from model.processor import write_synthetic_processor
from tests.test_export import in_process
from tests.test_parity import _fixture


def _checkpoint(folder: Path, tower: str) -> Path:
    """A Hugging Face BLIP folder (config.json, model.safetensors, tokenizer, image processor)
    holding the parity fixture's random tiny weights."""
    case = _fixture()
    cfg = case["config"].with_towers(tower)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    save_file({k: np.ascontiguousarray(v) for k, v in case[tower]["tensors"].items()}, str(folder / "model.safetensors"))
    write_synthetic_processor(folder, cfg)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return _checkpoint(root / "caption", "caption"), _checkpoint(root / "retrieval", "retrieval")


@pytest.fixture(scope="module")
def module(checkpoints):
    return MnemosyneSemioModule.from_checkpoints(list(checkpoints))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    made = {}

    def save(name, image):
        made[name] = folder / name
        image.save(made[name])

    save("photo.jpg", Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)))
    save("other.png", Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    save("gray.png", Image.fromarray(rng.integers(0, 255, (50, 70), dtype=np.uint8), "L"))
    save("rgba.png", Image.fromarray(rng.integers(0, 255, (40, 40, 4), dtype=np.uint8), "RGBA"))
    save("palette.gif", Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).convert("P"))
    save("tiny.png", Image.new("RGB", (1, 1), (200, 10, 10)))
    save("huge.png", Image.linear_gradient("L").resize((10000, 10000)))
    made["corrupt.jpg"] = folder / "corrupt.jpg"
    made["corrupt.jpg"].write_bytes((folder / "photo.jpg").read_bytes()[:300])
    made["notes.txt"] = folder / "notes.txt"
    made["notes.txt"].write_text("not an image")
    return made


def test_process_image_captions_every_kind_of_real_image(module, images):
    for name in ("photo.jpg", "gray.png", "rgba.png", "palette.gif", "tiny.png", "huge.png"):
        caption = module.process_image(images[name])
        assert isinstance(caption, str) and caption, name


def test_pipeline_reports_bad_files_per_image_and_finishes_the_batch(module, images):
    order = ["photo.jpg", "corrupt.jpg", "gray.png", "notes.txt", "rgba.png", "tiny.png", "huge.png", "other.png"]
    results, stats = ImagePipeline(module, batch_size=4).run([images[n] for n in order])
    assert [r.index for r in results] == list(range(len(order)))
    by_name = dict(zip(order, results))
    assert "corrupt image" in by_name["corrupt.jpg"].error and by_name["corrupt.jpg"].caption is None
    assert "not an image" in by_name["notes.txt"].error
    assert all(by_name[n].caption and by_name[n].error is None for n in order if n not in ("corrupt.jpg", "notes.txt"))
    assert (stats.images, stats.errors) == (6, 2) and stats.images_per_s > 0


def test_images_over_the_pixel_budget_or_not_regular_files_are_refused_before_decoding(tmp_path):
    import struct
    import zlib

    from capibara_export.semiotic.images import ImageError, load_image

    small = tmp_path / "small.png"
    Image.new("L", (8, 8)).save(small)
    data = bytearray(small.read_bytes())
    data[16:24] = struct.pack(">II", 17000, 17000)                        # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))       # and its CRC
    (tmp_path / "bomb.png").write_bytes(bytes(data))                      # 4.6 GB if it were decoded
    with pytest.raises(ImageError, match="17000x17000 = 289 MP is over the 100 MP pixel budget"):
        load_image(tmp_path / "bomb.png")
    with pytest.raises(ImageError, match="not a regular file"):
        load_image("/dev/zero")
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "absent.png")


def test_interpret_gives_distinct_readings_scored_by_the_score_function(module, images):
    result = module.interpret(images["photo.jpg"], k=3)
    sequences = [tuple(r["token_ids"]) for r in result["readings"]]
    assert len(sequences) == 3 and len(set(sequences)) == 3
    texts = [r["text"] for r in result["readings"]]
    fresh = module.score(images["photo.jpg"], texts)
    np.testing.assert_allclose([r["coherence"] for r in result["readings"]], fresh["itm_prob"], atol=1e-6)
    np.testing.assert_allclose([r["similarity"] for r in result["readings"]], fresh["itc_similarity"], atol=1e-6)
    assert 0.0 <= result["polysemy_index"] <= 2.0
    log_probs = [r["log_prob"] for r in result["readings"]]
    assert log_probs == sorted(log_probs, reverse=True)


def test_a_second_call_on_the_same_image_hits_the_embedding_cache(module, images):
    module.interpret(images["other.png"], k=2)
    before = module.metrics()["cache"]["embeddings"]
    SemioticInteraction(module).relate(images["other.png"], "a red painting", k=2)
    module.analyze_culture(images["other.png"])
    after = module.metrics()["cache"]["embeddings"]
    assert after["misses"] == before["misses"]
    assert after["hits"] > before["hits"]


def test_analyze_culture_scores_the_catalogue_and_accepts_your_own(module, images, tmp_path):
    before = module.metrics()["counts"].get("culture", 0)
    result = module.analyze_culture(images["photo.jpg"], top=3)
    assert module.metrics()["counts"]["culture"] == before + 1  # once per call, not twice
    assert set(result["categories"]) == {"movement", "genre", "medium", "symbol"}
    for rows in result["categories"].values():
        assert len(rows) == 3 and all(0 <= r["probability"] <= 1 for r in rows)
        assert [r["similarity"] for r in rows] == sorted((r["similarity"] for r in rows), reverse=True)
    mine = tmp_path / "codes.toml"
    mine.write_text('[mood]\ntemplate = "a {name} scene"\ncodes = ["calm", "violent"]\n')
    custom = module.analyze_culture(images["photo.jpg"], codes=mine)
    assert list(custom["categories"]) == ["mood"]
    assert sum(r["probability"] for r in custom["categories"]["mood"]) == pytest.approx(1.0)
    with pytest.raises(CodesError, match="unknown code"):
        module.analyze_culture(images["photo.jpg"], codes=["dadaism"])


def test_relate_returns_a_verdict_with_the_scores_behind_it(module, images):
    relation = SemioticInteraction(module).relate(images["photo.jpg"], "a painting of a king", k=3)
    assert relation["verdict"] in ("anchorage", "relay", "contradiction")
    assert relation["anchored_reading"] in [r["text"] for r in relation["readings"]]
    assert 0 <= relation["itm_prob"] <= 1 and relation["thresholds"]["match"] == 0.5


@pytest.mark.parametrize("thresholds, verdict", [
    (Thresholds(match=0.0, contradict=0.0, anchor_similarity=-1.0), "anchorage"),
    (Thresholds(match=2.0, contradict=1.5, anchor_similarity=2.0), "contradiction"),
    (Thresholds(match=2.0, contradict=-1.0, anchor_similarity=2.0), "relay"),
])
def test_verdicts_follow_the_thresholds(module, images, thresholds, verdict):
    assert SemioticInteraction(module, thresholds).relate(images["tiny.png"], "a red dot", k=2)["verdict"] == verdict


def test_metrics_accumulate_counts_latency_throughput_and_coherence(module, images):
    module.coherence(images["gray.png"], k=2)
    m = module.metrics()
    assert m["counts"]["images"] > 0 and m["counts"]["interpretations"] > 0
    assert {"p50_s", "p90_s", "p99_s"} <= set(m["latency"]["caption"])
    assert m["throughput"]["images_per_s"] > 0
    assert set(m["coherence"]) >= {"reading_coherence", "polysemy_index", "caption_coherence"}
    assert all(p["compiles"] >= 1 for p in m["cache"]["programs"].values())


def test_a_caption_only_checkpoint_captions_and_says_what_it_cannot_do(checkpoints, images):
    module = MnemosyneSemioModule.from_checkpoints([checkpoints[0]])
    assert module.process_image(images["photo.jpg"])
    assert module.interpret(images["photo.jpg"], k=2)["polysemy_index"] is None
    with pytest.raises(SemioticError, match="also pass a BlipForImageTextRetrieval checkpoint"):
        module.analyze_culture(images["photo.jpg"])


def test_random_weights_must_be_asked_for_and_then_warn(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))   # where its synthetic processor files go
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = MnemosyneSemioModule.random("tiny")
    assert module.random_weights and any("meaningless" in str(w.message) for w in caught)
    assert not list(tmp_path.iterdir()), "the processor's temporary folder is left behind"
    assert module.captioner.preprocessor.prompt(None).size   # read on construction, usable after the folder went


def test_profile_usage_reports_only_what_the_backend_reports():
    usage = profile_usage()
    assert usage["device_count"] >= 1 and usage["device_kind"]
    assert usage["memory"] is None and "reports no memory statistics" in usage["memory_note"]  # CPU backend


def cli(*args):
    return in_process("analyze", *args)


def test_cli_json_lines_profile_trace_and_bad_arguments(checkpoints, images, tmp_path):
    result = cli(images["photo.jpg"], images["notes.txt"], "--checkpoint", checkpoints[0], "--checkpoint",
                 checkpoints[1], "--k", "2", "--text", "a king", "--json", "--profile", tmp_path / "trace")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[0]["caption"] and lines[0]["relation"]["verdict"] and len(lines[0]["interpretation"]["readings"]) == 2
    assert "not an image" in lines[1]["error"]
    assert lines[-1]["metrics"]["pipeline"]["errors"] == 1 and lines[-1]["metrics"]["usage"]["device_kind"]
    assert any((tmp_path / "trace").rglob("*.xplane.pb"))
    both = cli(images["photo.jpg"], "--random-weights", "--bundle", tmp_path)
    assert both.returncode == 2 and "exactly one of --checkpoint" in both.stderr


@pytest.mark.slow
def test_a_bundle_serves_the_module(images, tmp_path):
    # a 2x2 mesh: the module serves the portable exports, whatever mesh the sharded programs were built for
    build = subprocess.run([sys.executable, "-m", "capibara_export", "build", "--target", "cpu", "--mesh", "2x2",
                            "--model", "tiny", "--quiet", "--entries", "encode_image", "--plans", "dp",
                            "--precisions", "fp32", "--export", "--random-weights", "--no-saved-model", "--out", str(tmp_path)],
                           capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stderr[-2000:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = MnemosyneSemioModule.from_bundle(tmp_path / "tiny-cpu-2x2" / "bundle")
    assert module.process_image(images["photo.jpg"])
    result = module.interpret(images["photo.jpg"], k=3)
    assert len({tuple(r["token_ids"]) for r in result["readings"]}) == 3 and result["polysemy_index"] is not None
