"""finetune.py task=integration: a batch-corrected embedding from a pretrained export, next to PCA and Harmony."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sc_foundation import tasks
from sc_foundation.models.configuration import ScFoundationConfig
from sc_foundation.models.export import load_pretrained
from sc_foundation.models.modeling import ScFoundationForBatchIntegration, grad_reverse
from sc_foundation.tasks.evaluation import batch_mixing_control
from sc_foundation.tasks.integration import KLWarmup, kl_warmup
from tests.conftest import CELLBENCH
from tests.test_finetune import compose_finetune, overrides

SCORES = ("nmi", "ari", "asw_label", "isolated_labels", "clisi", "asw_batch", "ilisi", "graph_connectivity")
SUMMARIES = ("bio", "batch", "total", "avg_bio")


def run_cellbench_integration(pretrained, cellbench, out, *extra) -> dict:
    """``task=integration`` on CellBench's protocols with the test budget; ``extra`` overrides come last and win."""
    cfg = compose_finetune(
        overrides(
            pretrained,
            f"[{cellbench}]",
            out,
            "task=integration",
            "batch_key=batch",
            "label_key=cell_type",
            "trainer.max_epochs=2",
            "baselines.n_pcs=20",
            "baselines.scvi=false",  # scVI has its own tests (tests/test_scvi_baselines.py); it takes minutes here
            *extra,
        )
    )
    return tasks.run(cfg)


@pytest.fixture(scope="module")
def integration(pretrained, cellbench, tmp_path_factory):
    # The discriminator is off by default; here it is on, so that its path (export, reload) runs end to end. The
    # attraction's runs (tests/test_cross_batch.py) cover the default, without it.
    return run_cellbench_integration(pretrained, cellbench, tmp_path_factory.mktemp("integration"), "dab_weight=0.1")


def test_gradient_reversal_negates_and_scales_the_gradient():
    x = torch.randn(4, 3, requires_grad=True)
    weight = torch.randn(4, 3)
    y = grad_reverse(x, 0.5)
    assert torch.equal(y, x)
    (y * weight).sum().backward()
    torch.testing.assert_close(x.grad, -0.5 * weight)


def test_discriminator_learns_the_batch_while_the_encoder_gets_the_reversed_gradient():
    config = ScFoundationConfig(
        vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, n_bins=5
    )
    config.batch_names, config.dab_weight, config.decoder_gene_ids = ["a", "b"], 1.0, [5, 6, 7, 8, 9, 10]
    torch.manual_seed(0)
    model = ScFoundationForBatchIntegration(config)
    input_ids = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 0]])
    inputs = {
        "input_ids": input_ids,
        "values": torch.tensor([[0.0, 1, 2, 3], [0, 4, 1, 0]]),
        "attention_mask": input_ids != 0,
        "batch_ids": torch.tensor([0, 1]),
        "counts": torch.tensor([[3.0, 1, 2, 0, 0, 0], [0, 0, 0, 4, 1, 0]]),
    }
    output = model(**inputs)
    assert output.logits.shape == (2, 6)  # every panel gene of every cell, the undetected ones too
    torch.testing.assert_close(output.loss, output.reconstruction_loss + output.dab_loss)
    # Through the reversal the encoder gets the negated gradient of the discriminator's loss; the discriminator
    # itself gets the plain one.
    params = [model.sc_foundation.norm.weight, model.discriminator.fc_out.weight]
    reversed_grads = torch.autograd.grad(output.dab_loss, params, retain_graph=True)
    plain = F.cross_entropy(model.discriminator(output.cell_embedding), inputs["batch_ids"])
    plain_grads = torch.autograd.grad(plain, params)
    assert reversed_grads[0].abs().sum() > 0
    torch.testing.assert_close(reversed_grads[0], -plain_grads[0])
    torch.testing.assert_close(reversed_grads[1], plain_grads[1])
    assert model(inputs["input_ids"], inputs["values"], inputs["attention_mask"]).loss is None
    model.eval()  # validation: the reconstruction alone, without the adversarial term
    evaluated = model(**inputs)
    torch.testing.assert_close(evaluated.loss, evaluated.reconstruction_loss)
    with pytest.raises(ValueError, match="batch-conditioned: pass batch_ids"):
        model(inputs["input_ids"], inputs["values"], inputs["attention_mask"], counts=inputs["counts"])


def test_the_kl_warm_up_raises_trainings_share_of_the_kl_weight_linearly_then_holds_it(capsys):
    base = ["pretrained=model", "data.files=[cells.h5ad]", "task=integration", "batch_key=batch"]
    packaged = kl_warmup(compose_finetune(base))  # over the whole packaged run, as scVI's default
    assert isinstance(packaged, KLWarmup) and packaged.epochs == 100 and capsys.readouterr().out == ""
    assert kl_warmup(compose_finetune([*base, "kl_warmup_epochs=0"])) is None
    assert kl_warmup(compose_finetune([*base, "latent_size=null"])) is None  # no KL term to warm up
    with pytest.raises(ValueError, match="kl_warmup_epochs=-1 must be 0"):
        kl_warmup(compose_finetune([*base, "kl_warmup_epochs=-1"]))
    warmup = kl_warmup(compose_finetune([*base, "kl_warmup_epochs=4"]))
    model = SimpleNamespace(kl_share=1.0)
    shares = []
    for epoch in range(6):
        warmup.on_train_epoch_start(SimpleNamespace(current_epoch=epoch), SimpleNamespace(model=model))
        shares.append(model.kl_share)
    assert shares == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    kl_warmup(compose_finetune([*base, "kl_warmup_epochs=200"]))  # longer than the packaged 100 epochs
    assert "outlasts the run's 100 epochs" in capsys.readouterr().out


def mixed_and_separated(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Three types of 90 cells in 8 dimensions over three batches: one embedding where the batches sit apart within
    each type, one where they are mixed. Returns (separated, mixed, batches, labels)."""
    labels = np.repeat(["a", "b", "c"], 90)
    batches = np.tile(np.repeat(["x", "y", "z"], 30), 3)
    types = rng.normal(scale=10.0, size=(3, 8))[np.repeat(np.arange(3), 90)]
    mixed = types + rng.normal(size=(270, 8))
    shifts = rng.normal(scale=3.0, size=(3, 8))[np.tile(np.repeat(np.arange(3), 30), 3)]
    return mixed + shifts, mixed, batches, labels


def test_the_mixed_control_tells_batch_signal_from_geometry():
    separated, mixed, batches, labels = mixed_and_separated(np.random.default_rng(0))
    kept = batch_mixing_control(separated, batches, labels, shuffles=3)
    gone = batch_mixing_control(mixed, batches, labels, shuffles=3)
    # Batches apart within types: the real scores fall well under what the same geometry scores when mixed.
    assert kept["asw_batch"] < kept["asw_batch_mixed"] - 0.1 and kept["ilisi"] < kept["ilisi_mixed"] - 0.2
    # Already mixed: real and control agree.
    assert gone["asw_batch"] == pytest.approx(gone["asw_batch_mixed"], abs=0.03)
    assert gone["ilisi"] == pytest.approx(gone["ilisi_mixed"], abs=0.03)
    with pytest.raises(ValueError, match="shuffles must be at least 1"):
        batch_mixing_control(mixed, batches, labels, shuffles=0)


def test_batch_mixing_benchmark_scores_every_embedding_of_a_run(import_benchmark, tmp_path):
    separated, mixed, batches, labels = mixed_and_separated(np.random.default_rng(1))
    run = tmp_path / "run"
    run.mkdir()
    cell_id = np.array([f"c{i}" for i in range(270)])
    np.savez(run / "embeddings.npz", model=mixed, pca=separated, cell_id=cell_id, batch=batches, label=labels)
    control = import_benchmark("batch_mixing_control")
    record = control.main([str(run), "--out", str(tmp_path / "out"), "--shuffles", "2"])
    saved = json.loads((tmp_path / "out" / "batch_mixing_control.json").read_text())
    assert saved["runs"] == json.loads(json.dumps(record["runs"])) and set(saved["runs"][str(run)]) == {"model", "pca"}
    scores = saved["runs"][str(run)]
    assert scores["pca"]["asw_batch"] < scores["pca"]["asw_batch_mixed"]
    assert "| model |" in (tmp_path / "out" / "batch_mixing_control.md").read_text()
    np.savez(run / "embeddings.npz", model=mixed, cell_id=cell_id, batch=batches)
    with pytest.raises(ValueError, match="has no labels"):
        control.main([str(run), "--out", str(tmp_path / "out")])
    with pytest.raises(FileNotFoundError, match="pass the output directory of an integration run"):
        control.main([str(tmp_path), "--out", str(tmp_path / "out")])


def test_integrates_cellbench_protocols(integration):
    out, metrics = integration["output_dir"], integration["metrics"]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert saved["batches"] == ["sc_celseq2", "sc_dropseq"] and saved["n_cells"]["all"] == 499
    for name, scores in {"model": saved["model"], **saved["baselines"]}.items():
        assert set(scores) == {*SCORES, *SUMMARIES}, name
        # ARI is chance-corrected: a random clustering scores about 0, possibly a little below.
        low = {key: -0.5 if key == "ari" else 0.0 for key in scores}
        assert all(np.isfinite(scores[key]) and low[key] <= scores[key] <= 1.0 for key in scores), (name, scores)
        assert scores["total"] == pytest.approx(0.6 * scores["bio"] + 0.4 * scores["batch"])
    assert saved["baselines"]["harmony"]["ilisi"] > saved["baselines"]["pca"]["ilisi"]
    # the backbone before fine-tuning, on the same tokens: its pooled embedding (32 wide here), scored like the rest
    assert set(saved["baselines"]) == {"pca", "harmony", "pretrained"}
    assert saved["baselines"]["pretrained"] != saved["model"]
    embeddings = np.load(out / "embeddings.npz")
    # the variational latent's mean (latent_size), not the 32-wide backbone output
    assert embeddings["model"].shape == (499, saved["latent_size"]) == (499, 16)
    assert embeddings["pca"].shape == embeddings["harmony"].shape and embeddings["pretrained"].shape == (499, 32)
    assert len(embeddings["cell_id"]) == len(embeddings["batch"]) == len(embeddings["label"]) == 499


def test_export_loads_and_reproduces_the_embedding(integration):
    model = load_pretrained(integration["export"], device="cpu")
    assert isinstance(model, ScFoundationForBatchIntegration)
    assert model.config.batch_names == ["sc_celseq2", "sc_dropseq"]
    # the variational latent (a default), and the batch discriminator (dab_weight=0.1 here) reading it
    assert model.latent is not None and model.discriminator.fc_in.in_features == model.config.latent_size
    embedding, cells = tasks.predict(model, integration["datamodule"].predict_dataloader(), "cell_embedding")
    np.testing.assert_allclose(embedding[np.argsort(cells)], integration["embedding"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("edit", "batch_key", "message"),
    [
        (lambda a: None, "protocol", r"relabelled.h5ad: batch_key='protocol' is not an obs column; obs columns: \["),
        (lambda a: a.obs.__setitem__("batch", "sc_dropseq"), "batch", "batch_key='batch' has a single value"),
    ],
    ids=["missing_batch_key", "single_batch"],
)
def test_bad_batches_are_refused(pretrained, real_slice, tmp_path, edit, batch_key, message):
    adata = real_slice(CELLBENCH, 60)
    edit(adata)
    path = tmp_path / "relabelled.h5ad"
    adata.write_h5ad(path)
    extra = ("task=integration", f"batch_key={batch_key}")
    cfg = compose_finetune(overrides(pretrained, f"[{path}]", tmp_path / "out", *extra))
    with pytest.raises(ValueError, match=message):
        tasks.run(cfg)
