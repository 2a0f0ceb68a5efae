"""Refusal by novelty (sc_foundation.models.novelty): the reference, its threshold, its file in the export, and
annotate() labelling novel cells unknown."""

import shutil

import numpy as np
import pytest

from sc_foundation.models.checksums import ChecksumError, read_checksums, verify_checksums
from sc_foundation.models.export import add_export_file, load_pretrained
from sc_foundation.models.novelty import NOVELTY_FILE, NoveltyReference, reference_choice
from sc_foundation.tasks.calibration import IGNORE, novelty_report


def clusters(rng, centres: np.ndarray, n: int) -> np.ndarray:
    """(n, d) cells scattered (sd 1) around centres drawn in turn from the (k, d) ``centres``."""
    return centres[np.arange(n) % len(centres)] + rng.normal(0, 1, (n, centres.shape[1]))


@pytest.fixture
def tiny_export(pretrained, tmp_path):
    """A copy of the session's tiny pretrained export, free to change."""
    return shutil.copytree(pretrained, tmp_path / "export")


@pytest.fixture
def known_and_unseen():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, (3, 8))  # three known types, far apart
    far = centres.mean(0) + 30.0  # a type the classifier never saw, far from all three
    return rng, centres, clusters(rng, far[None], 50)


def test_threshold_accepts_the_coverage_of_validation_cells_and_refuses_a_far_type(known_and_unseen):
    rng, centres, unseen = known_and_unseen
    train, val, test = clusters(rng, centres, 600), clusters(rng, centres, 400), clusters(rng, centres, 300)
    reference = NoveltyReference.fit(train, val, neighbors=5, coverage=0.9)
    assert np.mean(reference.scores(val) <= reference.threshold) == pytest.approx(0.9, abs=0.005)
    report = novelty_report(reference, np.concatenate([test, unseen]), np.r_[np.zeros(300, int), np.full(50, IGNORE)])
    assert report["unseen_refused"] == 1.0 and report["auroc_unseen"] == 1.0
    assert 0.03 < report["known_refused"] < 0.2  # new known cells are refused about as often as validation cells
    assert report["n_known"] == 300 and report["n_unseen"] == 50 and report["n_reference"] == 600


def test_scores_are_the_distance_to_the_kth_nearest_reference_cell_and_nan_without_an_embedding():
    reference = NoveltyReference(np.array([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]], np.float32), 2, 1.5, 0.95)
    scores = reference.scores(np.array([[0.0, 0.0], [10.0, 0.0], [np.nan, 0.0]]))
    assert scores[:2] == pytest.approx([1.0, 9.0]) and np.isnan(scores[2])
    assert (scores > reference.threshold).tolist() == [False, True, False]  # annotate's refusal: NaN is not novel
    with pytest.raises(ValueError, match="do not match the novelty reference's width 2"):
        reference.scores(np.zeros((1, 3)))


def test_reference_keeps_a_seeded_choice_of_at_most_max_cells():
    first, again = reference_choice(500, 120, 3), reference_choice(500, 120, 3)
    assert len(first) == 120 and len(np.unique(first)) == 120 and np.array_equal(first, again)
    assert np.array_equal(first, np.sort(first)) and first.max() < 500
    assert np.array_equal(reference_choice(50, 120, 0), np.arange(50))
    assert not np.array_equal(reference_choice(500, 120, 3), reference_choice(500, 120, 4))
    with pytest.raises(ValueError, match="novelty_reference_cells must be at least 1"):
        reference_choice(10, 0, 0)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"coverage": 0.0}, r"coverage must lie in \(0, 1\]"),
        ({"neighbors": 11}, "1 <= neighbors <= n_ref"),
    ],
)
def test_fit_refuses_bad_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        NoveltyReference.fit(np.zeros((10, 2)), np.zeros((4, 2)), **settings)


def test_fit_refuses_empty_validation_and_non_finite_embeddings():
    with pytest.raises(ValueError, match="validation split is empty"):
        NoveltyReference.fit(np.zeros((10, 2)), np.zeros((0, 2)))
    with pytest.raises(ValueError, match="NaN or infinite"):
        NoveltyReference.fit(np.full((10, 2), np.nan), np.zeros((4, 2)))


def test_reference_round_trips_through_the_export_and_its_checksums(known_and_unseen, tiny_export, tmp_path):
    rng, centres, _ = known_and_unseen
    reference = NoveltyReference.fit(clusters(rng, centres, 60), clusters(rng, centres, 30), coverage=0.8)
    assert NoveltyReference.load(tiny_export) is None
    before = read_checksums(tiny_export)
    add_export_file(tiny_export, NOVELTY_FILE, reference.save)
    after = read_checksums(tiny_export)
    assert NOVELTY_FILE in after and verify_checksums(tiny_export)
    assert {name: after[name] for name in before} == before  # the other files' lines kept as they were
    loaded = NoveltyReference.load(tiny_export)
    assert np.array_equal(loaded.embeddings, reference.embeddings)
    assert (loaded.neighbors, loaded.threshold, loaded.coverage) == (5, reference.threshold, 0.8)
    assert not list(tiny_export.glob(".*tmp*"))  # no staging file left behind
    assert (tiny_export / NOVELTY_FILE).stat().st_mode == (tiny_export / "config.json").stat().st_mode  # readable
    assert load_pretrained(tiny_export).novelty_reference.threshold == reference.threshold
    assert load_pretrained(tiny_export, pooling="cls").novelty_reference is None  # another embedding than its own
    # Replaced: its line follows the new file, and the folder still verifies.
    add_export_file(tiny_export, NOVELTY_FILE, NoveltyReference(reference.embeddings[:7], 1, 1.0, 0.5).save)
    assert read_checksums(tiny_export)[NOVELTY_FILE] != after[NOVELTY_FILE] and verify_checksums(tiny_export)
    assert NoveltyReference.load(tiny_export).coverage == 0.5


def test_a_damaged_export_is_not_re_signed(tiny_export):
    weights = tiny_export / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    reference = NoveltyReference(np.zeros((5, 2), np.float32), 1, 1.0, 0.95)
    with pytest.raises(ChecksumError, match=r"model\.safetensors is corrupt"):
        add_export_file(tiny_export, NOVELTY_FILE, reference.save)
    assert not (tiny_export / NOVELTY_FILE).exists()


def test_a_reference_in_the_pretrained_embedding_carries_its_encoder_through_the_file(known_and_unseen, tiny_export):
    rng, centres, _ = known_and_unseen
    state = {"encoder.w": rng.normal(size=(4, 3)).astype(np.float32), "steps": np.arange(3)}
    reference = NoveltyReference.fit(clusters(rng, centres, 60), clusters(rng, centres, 30), encoder_state=state)
    assert reference.space == "pretrained" and NoveltyReference(reference.embeddings, 1, 1.0, 0.5).space == "classifier"
    add_export_file(tiny_export, NOVELTY_FILE, reference.save)
    loaded = NoveltyReference.load(tiny_export)
    assert loaded.space == "pretrained" and set(loaded.encoder_state) == set(state)
    assert all(np.array_equal(loaded.encoder_state[name], state[name]) for name in state)
    assert loaded.threshold == reference.threshold and np.array_equal(loaded.embeddings, reference.embeddings)
    fix = r"do not fit this model .* from the novelty reference's encoder: re-run the fine-tuning that wrote novelty_"
    with pytest.raises(ValueError, match=fix):  # weights of another architecture
        loaded.encoder(load_pretrained(tiny_export))
