"""Tests of tools/calibration_data.py (calibration and evaluation sets from disjoint sources) and
tools/tasks.py (the task metrics the benchmark reports). Builders need the fetched models
(``zoo`` marker); the metrics and the text sources do not."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxopt.inputs import check_feeds, load_feeds
from tools import calibration_data as cd
from tools import tasks, zoo

ZOO = zoo.DEFAULT_DEST


def _need(model: str) -> None:
    if not zoo.model_path(ZOO, model).is_file():
        pytest.skip(f"{model} is absent (run tools/fetch_models.py)")
    if model.startswith(("minilm", "romanizer")):
        entry = zoo.find_entry(model)
        if not (ZOO / ".wheels" / entry["source"]["wheel_file"]).is_file():
            pytest.skip(f"the {entry['source']['wheel']} wheel is absent (tools/fetch_models.py)")


def _digest(feed: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(feed):
        h.update(name.encode() + str(feed[name].dtype).encode() + feed[name].tobytes())
    return h.hexdigest()


def _session(model: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(zoo.model_path(ZOO, model)), options,
                                providers=["CPUExecutionProvider"])


# --- tasks -----------------------------------------------------------------------------------


def test_edit_distance_and_cer_of_known_strings():
    assert tasks.edit_distance("kitten", "sitting") == 3
    assert tasks.edit_distance("", "abc") == 3
    assert tasks.edit_distance([5, 7, 9], [5, 9]) == 1
    # one substitution in 5 reference characters
    assert tasks.character_error_rate(["abc", "de"], ["abd", "de"]) == pytest.approx(1 / 5)
    # insertions count too, so a CER can exceed 1
    assert tasks.character_error_rate(["a"], ["xyz"]) == pytest.approx(3.0)
    assert tasks.character_error_rate([""], [""]) == 0.0
    assert tasks.character_error_rate([""], ["a"]) == 1.0
    with pytest.raises(ValueError):
        tasks.character_error_rate(["a"], [])


def test_ctc_greedy_decode_merges_repeats_and_drops_blank():
    assert tasks.ctc_collapse([0, 5, 5, 0, 5, 3, 3, 0]) == [5, 5, 3]
    steps = [0, 2, 2, 0, 2, 1, 1]
    probs = np.eye(3, dtype=np.float32)[steps][None]  # [1, 7, 3]
    assert tasks.ctc_greedy_decode(probs) == [[2, 2, 1]]
    assert tasks.ctc_greedy_decode(probs[0]) == [[2, 2, 1]]
    assert tasks.ctc_greedy_decode(probs.transpose(1, 0, 2), time_major=True) == [[2, 2, 1]]
    assert tasks.ctc_greedy_decode(probs, blank=2) == [[0, 0, 1]]  # a blank splits the 0s


def test_detection_iou_of_known_masks():
    a = np.zeros((1, 1, 10, 10), np.float32)
    b = np.zeros_like(a)
    a[..., 0:4, 0:4] = 0.9  # 16 pixels
    b[..., 2:6, 0:4] = 0.9  # 16 pixels, 8 shared
    assert tasks.detection_iou(a, b) == pytest.approx(8 / 24)
    b[..., 2:6, 0:4] = 0.3  # not above the threshold: no text pixel in b
    assert tasks.detection_iou(a, b) == 0.0
    assert tasks.detection_iou(np.zeros_like(a), np.zeros_like(a)) == 1.0
    with pytest.raises(ValueError):
        tasks.detection_iou(a, a[..., :5])


def test_argmax_agreement():
    reference = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    candidate = np.array([[0.8, 0.2], [0.7, 0.3], [0.6, 0.4], [0.1, 0.9]])
    assert tasks.argmax_agreement(reference, candidate) == pytest.approx(0.75)


def test_masked_cosine_ignores_padding():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(2, 5, 4))
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    candidate = reference.copy()
    candidate[mask == 0] = rng.normal(size=(int((mask == 0).sum()), 4)) * 100
    assert tasks.masked_cosine(reference, candidate, mask) == pytest.approx(1.0)
    assert tasks.masked_cosine(reference, -reference, mask) == pytest.approx(-1.0)
    # a token orthogonal to its reference: cosine = the kept tokens' share of the squared norm
    ref = np.zeros((1, 2, 2))
    ref[0, 0] = [1, 0]
    ref[0, 1] = [1, 0]
    cand = ref.copy()
    cand[0, 1] = [0, 1]
    assert tasks.masked_cosine(ref, cand, np.array([[1, 1]])) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        tasks.masked_cosine(ref, cand, np.array([[0, 0]]))


# --- sources and rendering (no model) ----------------------------------------------------------


def test_text_sources_are_disjoint_and_english():
    calibration = cd.english_sentences("calibration")
    evaluation = cd.english_sentences("evaluation")
    assert len(calibration) >= 100 and len(evaluation) >= 100
    assert not set(calibration) & set(evaluation)
    assert all(s[0].isupper() and 5 <= len(s.split()) <= 40 for s in calibration + evaluation)
    fonts = [set(cd.fonts(split)) for split in cd.SPLITS]
    assert fonts[0] == fonts[1] == {None} or not fonts[0] & fonts[1]


def test_minilm_calibration_prose_adds_documentation_apart_from_evaluation(monkeypatch, tmp_path):
    """MiniLM's calibration prose: the license sentences first, then documentation and manual
    pages (at most PER_PAGE sentences a page), never an evaluation sentence; without them (a
    fresh CI image) the licenses alone."""
    evaluation = cd.english_sentences("evaluation")
    doc, man = tmp_path / "doc", tmp_path / "man"
    (doc / "tool").mkdir(parents=True)
    (man / "man1").mkdir(parents=True)
    (doc / "tool" / "README").write_text(
        "The tool reads its settings from a file in the home folder. " + evaluation[0])
    (doc / "tool" / "changelog").write_text("Fixed a crash when the settings file is empty.")
    page = "\n".join([".TH TOOL 1", ".SH DESCRIPTION", ".B Tool",
                      r"prints the \fBcurrent\fR settings \- one per line, sorted by name."]
                      + [f"Sentence number {i} of the long manual page here." for i in range(40)])
    (man / "man1" / "tool.1").write_text(page)
    monkeypatch.setattr(cd, "DOC_ROOT", doc)
    monkeypatch.setattr(cd, "MAN_ROOT", man)
    cd.english_prose.cache_clear()
    try:
        prose = cd.english_prose("calibration")
        monkeypatch.setattr(cd, "DOC_ROOT", tmp_path / "absent")
        monkeypatch.setattr(cd, "MAN_ROOT", tmp_path / "absent")
        cd.english_prose.cache_clear()
        bare = cd.english_prose("calibration")
    finally:
        cd.english_prose.cache_clear()
    licenses = cd.english_sentences("calibration")
    assert prose[:len(licenses)] == licenses and bare == licenses
    extra = prose[len(licenses):]
    assert extra[0] == "The tool reads its settings from a file in the home folder."
    assert not set(prose) & set(evaluation)
    assert "Fixed a crash when the settings file is empty." not in extra
    assert "Tool prints the current settings - one per line, sorted by name." in extra
    assert len(extra) == 1 + cd.PER_PAGE
    assert cd.english_prose("evaluation") == evaluation


def test_lines_render_with_pillows_builtin_font(monkeypatch, tmp_path):
    """A machine without TrueType fonts (a fresh CI image) falls back to Pillow's own font."""
    monkeypatch.setattr(cd, "FONT_ROOT", tmp_path / "no-fonts")
    cd.fonts.cache_clear()
    try:
        assert cd.fonts("calibration") == (None,)
        image = cd.render_line("Total 1,234.56", None, 30, np.random.default_rng(0))
        line = cd.paddle_line(image, 48, 320)
    finally:
        cd.fonts.cache_clear()
    assert line.shape == (3, 48, 320) and line.dtype == np.float32
    ink = line[:, :, : line.shape[2] // 2].min()
    assert ink < -0.3  # dark text on a light background, normalized to [-1, 1]


def test_magika_features_follow_magika():
    """Small files are stripped on both sides; larger ones lstripped at the start and rstripped
    at the end; short parts are padded with 256 (after the start, before the end)."""
    small = b"  \n#!/bin/sh\necho hi\n\n"
    stripped = list(small.strip())
    features = cd.magika_features(small, beg_size=8, end_size=8, block_size=64)
    assert features.dtype == np.int32
    assert features.tolist() == stripped[:8] + stripped[-8:]
    large = b"   " + b"A" * 100 + b"B" * 100 + b"\n\n"
    features = cd.magika_features(large, beg_size=62, end_size=63, block_size=64)
    assert features.tolist() == [65] * 61 + [256] + [256] + [66] * 62
    assert cd.magika_features(b"ab", beg_size=4, end_size=4, block_size=64).tolist() == \
        [97, 98, 256, 256, 256, 256, 97, 98]


# --- builders (real models) -------------------------------------------------------------------

#: Cheap-to-build models covering every family; each is built with 3 feeds per split.
FAMILIES = ["minilm_l6", "ch_PP-OCRv4_rec_infer", "ch_ppocr_mobile_v2.0_cls_infer",
            "ch_PP-OCRv4_det_infer", "ddddocr_common", "ddddocr_common_det", "slanet_en",
            "silero_vad", "silero_vad_16k_sequence", "dtln_model_2", "asr_nemo128", "magika",
            "nudenet_320n", "romanizer_decoder"]


@pytest.mark.zoo
@pytest.mark.parametrize("model", FAMILIES)
def test_feeds_match_the_model_and_splits_are_disjoint(model):
    _need(model)
    proto = onnx.load(str(zoo.model_path(ZOO, model)), load_external_data=False)
    sets = {split: cd.build(model, split, 3) for split in cd.SPLITS}
    for split, data in sets.items():
        assert len(data.feeds) == 3
        assert check_feeds(proto, data.feeds) == []
        assert all(np.isfinite(v).all() for f in data.feeds for v in f.values()
                   if v.dtype.kind == "f")
        json.dumps(data.info)
    digests = [{_digest(f) for f in sets[split].feeds} for split in cd.SPLITS]
    assert not digests[0] & digests[1]
    assert sets["calibration"].info["source"] != sets["evaluation"].info["source"]


@pytest.mark.zoo
@pytest.mark.parametrize("model", ["minilm_l6", "ch_PP-OCRv4_rec_infer", "silero_vad", "magika"])
def test_generation_is_deterministic(model):
    _need(model)
    first, second = (cd.build(model, "evaluation", 2) for _ in range(2))
    assert [_digest(f) for f in first.feeds] == [_digest(f) for f in second.feeds]
    other_seed = cd.build(model, "evaluation", 2, seed=1)
    assert [_digest(f) for f in other_seed.feeds] != [_digest(f) for f in first.feeds]


@pytest.mark.zoo
def test_minilm_batches_are_8_by_64_with_padding():
    _need("minilm_l6")
    data = cd.build("minilm_l6", "calibration", 2)
    feed = data.feeds[0]
    assert feed["input_ids"].shape == (8, 64)
    mask = feed["attention_mask"]
    assert mask[:, 0].all() and not mask.all()  # [CLS] kept, some padding
    assert (feed["input_ids"][mask == 0] == 0).all()  # [PAD] is id 0
    assert (feed["input_ids"][:, 0] == 101).all()  # [CLS]
    assert len(data.info["sentences"][0]) == 8


@pytest.mark.zoo
def test_written_sets_are_idempotent_forced_and_trimmed(tmp_path, capsys):
    model = "ch_ppocr_mobile_v2.0_cls_infer"
    _need(model)
    args = ["--models", model, "--dest", str(tmp_path), "--calibration", "3", "--evaluation", "2"]
    assert cd.main(args) == 0
    folder = tmp_path / model / "calibration"
    files = sorted(folder.glob("*.npz"))
    assert [f.name for f in files] == ["0000.npz", "0001.npz", "0002.npz"]
    assert [f.name for f in (tmp_path / model / "evaluation").glob("*.npz")] != []
    assert json.loads(folder.with_suffix(".json").read_text())["count"] == 3
    assert not list(folder.glob(".*.tmp"))
    stamps = [f.stat().st_mtime_ns for f in files]
    capsys.readouterr()
    assert cd.main(args) == 0
    assert "kept" in capsys.readouterr().out
    assert [f.stat().st_mtime_ns for f in files] == stamps
    feeds = load_feeds(folder)
    assert cd.main(args + ["--force"]) == 0
    assert [_digest(f) for f in load_feeds(folder)] == [_digest(f) for f in feeds]
    assert cd.main(["--models", model, "--dest", str(tmp_path), "--calibration", "2",
                    "--evaluation", "2"]) == 0
    assert [f.name for f in sorted(folder.glob("*.npz"))] == ["0000.npz", "0001.npz"]


def test_unknown_model_is_an_error(tmp_path, capsys):
    assert cd.main(["--models", "no_such_model", "--dest", str(tmp_path)]) == 1
    assert "no data builder" in capsys.readouterr().err


# --- the data means something to the fp32 models ----------------------------------------------


@pytest.mark.zoo
def test_angle_classifier_tells_0_from_180_degrees():
    model = "ch_ppocr_mobile_v2.0_cls_infer"
    _need(model)
    data = cd.build(model, "evaluation", 8)
    session = _session(model)
    predicted = [int(session.run(None, f)[0].argmax()) for f in data.feeds]
    assert predicted == data.info["labels"]


@pytest.mark.zoo
def test_recognizer_reads_the_rendered_lines():
    model = "PP-OCRv6_rec_small"
    _need(model)
    proto = onnx.load(str(zoo.model_path(ZOO, model)), load_external_data=False)
    characters = ["<blank>"] + {p.key: p.value for p in proto.metadata_props}[
        "character"].split("\n") + [" "]
    data = cd.build(model, "evaluation", 8)
    session = _session(model)
    decodes = [tasks.ctc_greedy_decode(session.run(None, f)[0])[0] for f in data.feeds]
    texts = ["".join(characters[i] for i in d) for d in decodes]
    assert all(texts)
    assert tasks.character_error_rate(data.info["texts"], texts) < 0.25


@pytest.mark.zoo
def test_vad_hears_speech_in_the_synthesized_audio():
    _need("silero_vad")
    data = cd.build("silero_vad", "evaluation", 24)
    fraction = np.ravel(data.info["speech_fraction"])
    probability = np.ravel(data.info["fp32_speech_probability"])
    speech, quiet = probability[fraction > 0.5], probability[fraction < 0.05]
    assert len(speech) and len(quiet)
    assert speech.mean() > 0.7 and quiet.mean() < 0.3


def test_quant_benchmark_tables_name_each_quality_column_once():
    """A model judged by its smallest output cosine gets no second "min cosine" column."""
    from tools.quant_benchmark import ModelResult, Row, markdown

    def table(metric):
        row = Row("r", "onnxopt r", "ok", size_pct=50, latency_ratio=0.5, metric=0.98,
                  min_cosine=0.99, max_abs=0.1, quantize_seconds=3)
        lines = markdown([ModelResult("m", "other", metric, "d", 1, 1, "{}", 1e6, 1.0, [row])],
                         3).splitlines()
        return [line for line in lines if line.startswith("|")]

    header, rule, row = table("cosine")
    assert header.count("cosine") == 1 and header.count("|") == rule.count("|") == row.count("|")
    header, rule, row = table("argmax")
    assert "| argmax agreement | min cosine |" in header and "| 0.9800 | 0.9900 |" in row
    assert header.count("|") == rule.count("|") == row.count("|")
