"""Benchmark: CPU training throughput of our masked-value model against a transformers BERT of the same shape.

The cells are real: the first ``--cells`` cells of ``kang_ifnb`` (written once as an ``.h5ad`` slice under the cache
folder), tokenized into a binned corpus store at ``--context`` (built once and reused while its plan matches). A
fixed list of ``--warmup-steps + --steps`` masked pretraining batches is drawn once through the path a training run
takes: ``CorpusDataModule(mask_ratio=0.15)`` train loader (``CellBatchSampler`` with length grouping ->
``StoreBatchDataset`` -> ``MaskingCollator``), epoch after epoch if one epoch holds too few batches.

For each model size (width, depth, heads and intermediate size of ``conf/model/<size>.yaml``) two models train on
those very batches, in this process, fp32 on CPU:

* ``ours``: :class:`~sc_foundation.models.modeling.ScFoundationForMaskedValueModeling` (binned values, vocabulary and
bins
  of the store), called through :class:`~sc_foundation.training.lightning_module.TrainingModule` (which drops the batch
  keys the model
  does not take) with the module's own AdamW (decayed / not-decayed groups) and learning-rate schedule;
* ``hf_bert``: ``transformers.BertForMaskedLM`` (the Geneformer architecture) of the same width, depth, heads,
  intermediate size, vocabulary size and dropout, ``attn_implementation="sdpa"``, fed the batch's ``input_ids`` (the
  masked positions set to ``<mask>``, as Geneformer's collator does) and ``attention_mask``, with ``labels`` the
  original gene id at the masked positions and -100 elsewhere; same AdamW groups and schedule.

A training step is forward, backward, gradient clipping at norm 1 (as ``Trainer(gradient_clip_val=1.0)``), AdamW
step, scheduler step and zeroing the gradients. Both models first run ``--warmup-steps`` untimed steps; the timed
steps then alternate between the two models (which one goes first alternates too), so a load spike on the shared
machine falls on both. ``torch.set_num_threads`` is fixed (``--threads``, default: the usable CPUs) and recorded.

Reported per model: cells/s, real tokens/s (padding excluded), padded tokens/s (every slot of the (B, L) batch),
seconds/step (mean and median over the timed steps), parameter counts (total, and non-embedding as in
``training_flops``); per size ``ratio_ours_vs_hf`` = our cells/s over BERT's.

Note that the two objectives differ in their output layer: ours scores ``n_bins`` bins at the masked positions only,
BERT scores the whole gene vocabulary at every position (transformers' ``BertForMaskedLM`` has no option to score
only the masked ones), so at a large vocabulary BERT's decoder is a large share of its step.

    python benchmarks/train_throughput.py --out train_throughput.json [--sizes tiny small] [--context 512]
        [--batch-size 16] [--steps 20] [--warmup-steps 3] [--cells 2000] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
from _corpus import DEFAULT_CACHE, DEFAULT_DATA, cached_binned_store, cached_slice, machine_info, write_json_atomic

from sc_foundation.conf import CONFIG_ROOT

KANG = "kang_ifnb/kang_ifnb.h5ad"
SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def model_shape(name: str) -> dict:
    """Width, depth, heads and intermediate size of ``conf/model/<name>.yaml``: the sizes ``train.py`` trains."""
    from omegaconf import OmegaConf

    config = OmegaConf.load(CONFIG_ROOT / "model" / f"{name}.yaml")
    return {key: config[key] for key in SHAPE_KEYS}


SIZES = ("tiny", "small")
MODELS = ("ours", "hf_bert")
LEARNING_RATE = 1e-4
WEIGHT_DECAY = 0.01
BETAS = (0.9, 0.98)
GRADIENT_CLIP = 1.0
HIDDEN_DROPOUT = 0.1  # our config's default, and BERT's
ATTENTION_DROPOUT = 0.0  # our config's default; BERT is set to match


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the results")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), help="conf/model/*.yaml names")
    parser.add_argument("--context", type=int, default=512, help="context length of the store's tokenizer")
    parser.add_argument("--batch-size", type=int, default=16, help="cells per batch")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per model")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed training steps per model first")
    parser.add_argument("--cells", type=int, default=2000, help="first cells of kang_ifnb in the store")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: usable CPUs)")
    parser.add_argument("--mask-ratio", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--min-cells-per-gene",
        type=int,
        default=1,
        help="vocabulary: genes detected in at least this many cells of the slice (1: every detected gene)",
    )
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="the shared real-data folder")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where the slice and store are cached")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup_steps < 0 or args.batch_size < 1 or args.cells < args.batch_size:
        parser.error("need --steps >= 1, --warmup-steps >= 0, --batch-size >= 1 and --cells >= --batch-size")
    return args


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------------------------- the data
def kang_slice(args) -> Path:
    """The first ``args.cells`` cells of kang_ifnb as an ``.h5ad`` file in the cache folder (written once)."""
    path = args.cache_dir / f"kang_first{args.cells}.h5ad"
    return cached_slice(args.data_dir / KANG, path, args.cells, evenly_spaced=False)


def build_or_reuse_store(slice_path: Path, args) -> tuple[Path, dict]:
    """The binned store of the slice (:func:`_corpus.cached_binned_store`) and facts about its build."""
    store_dir = args.cache_dir / f"train-store-binned-ctx{args.context}-{args.cells}-min{args.min_cells_per_gene}"
    info = cached_binned_store([slice_path], store_dir, args.context, min_cells_per_gene=args.min_cells_per_gene)
    return store_dir, info


def draw_batches(store_dir: Path, args, pack: bool = False) -> tuple[list[dict], object]:
    """``warmup_steps + steps`` masked pretraining batches from the real train loader, and the store.

    ``pack=True`` gives the same cells in the same batches, packed end to end (``cu_seqlens``) instead of padded.
    """
    from sc_foundation.data.datamodule import CorpusDataModule

    data = CorpusDataModule(
        store_dir,
        batch_size=args.batch_size,
        val_fraction=0.0,
        mask_ratio=args.mask_ratio,
        seed=args.seed,
        pack=pack,
    )
    data.setup("fit")
    loader = data.train_dataloader()
    wanted = args.warmup_steps + args.steps
    batches, epoch = [], 0
    while len(batches) < wanted:
        loader.sampler.set_epoch(epoch)
        before = len(batches)
        for batch in loader:
            batches.append(batch)
            if len(batches) == wanted:
                break
        if len(batches) == before:
            raise RuntimeError("the train loader produced no batch")
        epoch += 1
    return batches, data.store


def bert_inputs(batch: dict, mask_id: int) -> dict:
    """Geneformer's view of a masked batch: ``<mask>`` at the masked positions, labels the original gene there."""
    import torch

    ids, mask = batch["input_ids"], batch["mask"]
    return {
        "input_ids": torch.where(mask, torch.full_like(ids, mask_id), ids),
        "attention_mask": batch["attention_mask"].long(),
        "labels": torch.where(mask, ids, torch.full_like(ids, -100)),
    }


# --------------------------------------------------------------------------------------------- the models
def build_models(size: dict, store, context: int, seed: int):
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from sc_foundation.models.configuration import ScFoundationConfig
    from sc_foundation.models.modeling import ScFoundationForMaskedValueModeling

    vocab = store.vocab
    ours_config = ScFoundationConfig.from_tokenizer(
        store.tokenizer,
        **size,
        hidden_dropout_prob=HIDDEN_DROPOUT,
        attention_dropout_prob=ATTENTION_DROPOUT,
        max_position_embeddings=context,
    )
    bert_config = BertConfig(
        vocab_size=len(vocab),
        **size,
        hidden_act="gelu",
        hidden_dropout_prob=HIDDEN_DROPOUT,
        attention_probs_dropout_prob=ATTENTION_DROPOUT,
        max_position_embeddings=context,
        pad_token_id=vocab.pad_id,
    )
    bert_config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    ours = ScFoundationForMaskedValueModeling(ours_config)
    torch.manual_seed(seed)
    bert = BertForMaskedLM(bert_config)
    if bert.config._attn_implementation != "sdpa":
        raise RuntimeError(f"BERT runs {bert.config._attn_implementation} attention, not sdpa")
    return ours, bert


def parameter_counts(model) -> dict:
    from sc_foundation.training.lightning_module import count_non_embedding_parameters

    return {
        "params_total": sum(p.numel() for p in model.parameters()),
        "params_non_embedding": count_non_embedding_parameters(model),
    }


class Trainee:
    """One model with its optimiser and schedule, as TrainingModule configures them; ``step`` runs one step."""

    def __init__(self, model, inputs_of):
        from sc_foundation.training.lightning_module import TrainingModule

        self.module = TrainingModule(
            model,
            learning_rate=LEARNING_RATE,
            weight_decay=WEIGHT_DECAY,
            betas=BETAS,
            warmup_steps=1,
            max_steps=1000,
        )
        setup = self.module.configure_optimizers()
        self.optimizer = setup["optimizer"]
        self.scheduler = setup["lr_scheduler"]["scheduler"]
        self.inputs_of = inputs_of
        self.model = model
        model.train()

    def step(self, batch: dict) -> float:
        import torch

        loss = self.inputs_of(self, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRADIENT_CLIP)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def _ours_loss(trainee: Trainee, batch: dict):
    return trainee.module(batch).loss


def _bert_loss(trainee: Trainee, batch: dict):
    return trainee.model(**batch["bert"]).loss


# ------------------------------------------------------------------------------------------------ the run
def run_size(name: str, size: dict, batches: list[dict], store, args) -> dict:
    ours, bert = build_models(size, store, args.context, args.seed)
    trainees = {"ours": Trainee(ours, _ours_loss), "hf_bert": Trainee(bert, _bert_loss)}
    warm, timed = batches[: args.warmup_steps], batches[args.warmup_steps :]
    first_losses = {}
    for model_name, trainee in trainees.items():
        for batch in warm:
            first_losses.setdefault(model_name, trainee.step(batch))
    seconds = {m: [] for m in MODELS}
    losses = {m: [] for m in MODELS}
    for i, batch in enumerate(timed):
        order = MODELS if i % 2 == 0 else MODELS[::-1]
        for model_name in order:
            started = time.perf_counter()
            loss = trainees[model_name].step(batch)
            seconds[model_name].append(time.perf_counter() - started)
            losses[model_name].append(loss)
    cells = sum(int(b["attention_mask"].shape[0]) for b in timed)
    tokens = sum(int(b["attention_mask"].sum()) for b in timed)
    slots = sum(int(b["attention_mask"].numel()) for b in timed)
    result = {}
    for model_name, trainee in trainees.items():
        total = sum(seconds[model_name])
        result[model_name] = {
            "cells_per_s": cells / total,
            "tokens_per_s": tokens / total,
            "padded_tokens_per_s": slots / total,
            "seconds_per_step": total / len(timed),
            "seconds_per_step_median": statistics.median(seconds[model_name]),
            "seconds": total,
            **parameter_counts(trainee.model),
            "first_loss": first_losses.get(model_name, losses[model_name][0]),
            "last_loss": losses[model_name][-1],
        }
    result["ratio_ours_vs_hf"] = result["ours"]["cells_per_s"] / result["hf_bert"]["cells_per_s"]
    result["size"] = dict(size)
    result["timed_steps"] = len(timed)
    result["cells"] = cells
    result["tokens"] = tokens
    result["padded_tokens"] = slots
    return result


def format_table(results: dict[str, dict]) -> str:
    head = (
        f"{'size':<6} {'model':<8} {'params':>11} {'non-emb':>11} {'cells/s':>9} {'tokens/s':>10} "
        f"{'padded tok/s':>12} {'s/step':>8} {'ours/hf':>8}"
    )
    lines = [head, "-" * len(head)]
    for size, r in results.items():
        for model_name in MODELS:
            m = r[model_name]
            ratio = f"{r['ratio_ours_vs_hf']:>8.2f}" if model_name == "ours" else ""
            lines.append(
                f"{size:<6} {model_name:<8} {m['params_total']:>11,} {m['params_non_embedding']:>11,} "
                f"{m['cells_per_s']:>9.2f} {m['tokens_per_s']:>10,.0f} {m['padded_tokens_per_s']:>12,.0f} "
                f"{m['seconds_per_step']:>8.3f} {ratio}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    import torch

    args = parse_args(argv)
    threads = args.threads or usable_cpus()
    torch.set_num_threads(threads)
    machine = machine_info()
    slice_path = kang_slice(args)
    store_dir, store_info = build_or_reuse_store(slice_path, args)
    batches, store = draw_batches(store_dir, args)
    for batch in batches:  # Geneformer's inputs, made once outside the timing
        batch["bert"] = bert_inputs(batch, store.vocab.mask_id)
    lengths = [int(n) for b in batches for n in b["attention_mask"].sum(dim=1)]
    built = "reused" if store_info["reused"] else f"built in {store_info['seconds']:.1f} s"
    print(
        f"train throughput benchmark: {store_info['cells']:,} Kang cells at context {args.context} (store {built}), "
        f"vocabulary {len(store.vocab):,}, batch {args.batch_size}, {args.warmup_steps} warm-up + {args.steps} timed "
        f"steps per model, {threads} torch threads, fp32 CPU",
        flush=True,
    )
    results = {}
    for name in args.sizes:
        results[name] = run_size(name, model_shape(name), batches, store, args)
        r = results[name]
        print(
            f"{name}: ours {r['ours']['params_total']:,} parameters ({r['ours']['params_non_embedding']:,} "
            f"non-embedding), hf_bert {r['hf_bert']['params_total']:,} ({r['hf_bert']['params_non_embedding']:,}); "
            f"ours/hf cells/s {r['ratio_ours_vs_hf']:.2f}",
            flush=True,
        )
    machine["load_average_after_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    payload = {
        "machine": machine,
        "config": {
            "cells": store_info["cells"],
            "context": args.context,
            "batch_size": args.batch_size,
            "steps": args.steps,
            "warmup_steps": args.warmup_steps,
            "torch_threads": torch.get_num_threads(),
            "mask_ratio": args.mask_ratio,
            "seed": args.seed,
            "dtype": "float32",
            "device": "cpu",
            "vocab_size": len(store.vocab),
            "n_bins": store.tokenizer.config.n_bins,
            "min_cells_per_gene": args.min_cells_per_gene,
            "mean_tokens_per_cell": float(np.mean(lengths)),
            "optimizer": {
                "name": "AdamW",
                "learning_rate": LEARNING_RATE,
                "weight_decay": WEIGHT_DECAY,
                "betas": list(BETAS),
                "gradient_clip_norm": GRADIENT_CLIP,
            },
            "hidden_dropout": HIDDEN_DROPOUT,
            "attention_dropout": ATTENTION_DROPOUT,
            "hf_attn_implementation": "sdpa",
            "sizes": {name: model_shape(name) for name in args.sizes},
            "store": store_info,
            "slice": str(slice_path),
        },
        **results,
    }
    write_json_atomic(args.out, payload)
    print(format_table(results))
    print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
