"""Benchmark: embedding throughput of ``sc_foundation.embed`` on real cells, on the CPU (and on CUDA when present).

What is timed is the public inference path a user calls on an AnnData: ``sc_foundation.embed(adata, model)``, which
matches the genes to the model's vocabulary, tokenizes the counts on the fly (chunks of cells), sorts each chunk by
length, pads batches of ``--batch-size`` cells and runs the backbone forward under ``torch.inference_mode()``,
copying each batch's embedding back to a NumPy array. On the CPU every model runs twice, ``precision="fp32"`` and
``precision="bf16"`` (bf16 autocast; ``embed``'s ``auto`` picks it only on CPUs with native bf16, AMX or AVX512-BF16);
on CUDA in bf16 autocast, as ``embed`` does by itself.

Achieved FLOP/s are the useful forward FLOPs (real tokens only, padding not counted) of the median call over its
seconds: per cell of L tokens ``2·N·L + 4·n·L²·d`` (N non-embedding backbone parameters, n layers, d width), with each
cell's L from the store. The same run measures the machine's dense matmul rate in fp32 and bf16
(``sc_foundation.training.hardware.matmul_flops_per_s``, the best of 128 and 256 square products, same threads, measured
before and after the models and the higher kept, since a shared machine's load moves), and
every result reports its share of the peak of its own dtype. On a CPU without native bf16 (``fast_bf16`` false in
``machine``) that bf16 peak is an emulated rate, and autocast leaves part of the forward (attention, norms) in fp32:
its share can exceed 100% and says only that bf16 is not worth it there.

The cells are real: ``--cells`` evenly spaced cells of ``--dataset`` (Kang IFN-beta: control and stimulated PBMCs
alike; or pbmc3k), raw counts, written once as an ``.h5ad`` slice under the cache folder and read into memory before
timing. The tokenizer is the one a pretraining run on those cells would have: a binned corpus store of the slice at
``--context`` (built once, reused while its plan matches) gives the vocabulary and settings, and the models are
built from it with ``ScFoundationConfig.from_tokenizer`` as ``train.py`` does, with the architecture of
``conf/model/<size>.yaml``. Weights are untrained (throughput does not depend on them); each model is exported and
loaded back with ``load_pretrained``, the way a user gets one.

Published architectures (``--published scgpt geneformer_v1``, on the first ``--published-cells`` cells): scGPT
whole-human (512 wide, 12 layers, 8 heads, d_hid 512, 60,697 tokens) and Geneformer V1 (256 wide, 6 layers, 4 heads,
FFN 512, its 25,426 tokens, 2,048 positions) with random weights, written as the published folders by
``tests/published.py`` and loaded with ``load_pretrained``. The same padded batches of the converted tokenizer's
tokens go through our backbone and through the reference forward (the tests' scGPT reference built from
``torch.nn.TransformerEncoderLayer``; transformers' ``BertModel`` with ``output_hidden_states``), each pooled by the
source's convention, timed alike; ``embed`` end to end (tokenization included) is timed beside them.

Per model size and device: one untimed warm-up call of ``embed`` on the first ``--warmup-cells`` cells, then
``--repeats`` timed calls on all cells; reported are cells/s and real tokens/s of the median call, the seconds of
every call, the batch size, the torch threads and the mean tokens per cell (``<cls>`` included). The JSON records the
machine (and its load average: it may be shared); ``gpu.measured`` is false, with the reason, without CUDA.

    python benchmarks/inference.py --out inference.json [--sizes tiny small] [--cells 2000] [--dataset kang_ifnb]
        [--context 1024] [--batch-size 64] [--gpu-batch-size 256] [--threads N] [--repeats 1]
        [--published scgpt geneformer_v1] [--published-cells 256]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _corpus import (
    DEFAULT_CACHE,
    DEFAULT_DATA,
    REPO_ROOT,
    cached_binned_store,
    cached_slice,
    machine_info,
    write_json_atomic,
)

from sc_foundation.conf import CONFIG_ROOT

DATASETS = {"kang_ifnb": "kang_ifnb/kang_ifnb.h5ad", "pbmc3k": "pbmc3k/pbmc3k.h5ad"}
SIZES = ("tiny", "small")
CPU_BATCH_SIZE = 64  # embed()'s own default on the CPU
GPU_BATCH_SIZE = 256  # and on CUDA
PUBLISHED = {
    "scgpt": {"d_model": 512, "nlayers": 12, "nhead": 8, "d_hid": 512, "vocab_size": 60_697},
    "geneformer_v1": {"hidden_size": 256, "num_hidden_layers": 6, "num_attention_heads": 4, "intermediate_size": 512},
}
"""Published architectures (``tests/published.py`` writer arguments); scGPT's vocabulary is padded to its size."""
# The matmul peak is the best of these square sizes: small products stay in cache, and on CPUs without native bf16
# the emulated bf16 rate collapses on large ones (0.04 GFLOP/s at 1024 against 0.2 at 256 on an AVX2 EPYC, where
# one 1024 product takes a minute and one 512 product three seconds).
PEAK_SIZES = (128, 256)


def model_config(name: str) -> dict:
    """The architecture of ``conf/model/<name>.yaml`` (``ScFoundationConfig`` arguments), as ``train.py`` reads it."""
    from omegaconf import OmegaConf

    path = CONFIG_ROOT / "model" / f"{name}.yaml"
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the results")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), help="conf/model/*.yaml names")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="kang_ifnb", help="shared dataset of the cells")
    parser.add_argument("--cells", type=int, default=2000, help="evenly spaced cells of the dataset to embed")
    parser.add_argument("--context", type=int, default=1024, help="context length of the tokenizer (conf/data default)")
    parser.add_argument("--batch-size", type=int, default=CPU_BATCH_SIZE, help="cells per forward pass on the CPU")
    parser.add_argument("--gpu-batch-size", type=int, default=GPU_BATCH_SIZE, help="cells per forward pass on CUDA")
    parser.add_argument("--warmup-cells", type=int, default=128, help="cells of the untimed warm-up call per model")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls over all cells per model and device")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: usable CPUs)")
    parser.add_argument("--no-gpu", action="store_true", help="skip the CUDA measurement even when CUDA is there")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU measurement (benchmarks/gpu_check.py)")
    parser.add_argument(
        "--min-cells-per-gene", type=int, default=1, help="vocabulary: genes detected in at least this many cells"
    )
    parser.add_argument(
        "--published", nargs="*", choices=sorted(PUBLISHED), default=sorted(PUBLISHED), help="published architectures"
    )
    parser.add_argument("--published-cells", type=int, default=256, help="cells for the published architectures")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation and the tokenizer's seed")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="the shared real-data folder")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where the slice and store are cached")
    args = parser.parse_args(argv)
    if min(args.cells, args.batch_size, args.gpu_batch_size, args.warmup_cells, args.repeats, args.context) < 1:
        parser.error("--cells, --batch-size, --gpu-batch-size, --warmup-cells, --repeats and --context must be >= 1")
    return args


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------------------------- the data
def cells_slice(args) -> Path:
    """``args.cells`` evenly spaced cells of the dataset as an ``.h5ad`` file in the cache folder (written once)."""
    path = args.cache_dir / f"inference-{args.dataset}-{args.cells}.h5ad"
    return cached_slice(args.data_dir / DATASETS[args.dataset], path, args.cells, evenly_spaced=True)


def tokenizer_store(slice_path: Path, args) -> tuple[object, dict]:
    """The binned corpus store of the slice (built once, reused while its plan matches) and facts about it."""
    from sc_foundation.data.store import CorpusStore

    store_dir = args.cache_dir / f"inference-store-{slice_path.stem}-ctx{args.context}-min{args.min_cells_per_gene}"
    info = cached_binned_store(
        [slice_path], store_dir, args.context, min_cells_per_gene=args.min_cells_per_gene, seed=args.seed
    )
    store = CorpusStore(store_dir)
    lengths = store.obs["length"].to_numpy()
    info |= {"mean_tokens_per_cell": float(np.mean(lengths)), "max_tokens_per_cell": int(np.max(lengths))}
    return store, info


# ------------------------------------------------------------------------------------------- the measure
def load_model(size: str, tokenizer, directory: Path, device: str, seed: int):
    """An untrained masked-value model of ``conf/model/<size>.yaml`` for ``tokenizer``, exported to ``directory``
    and loaded back with ``load_pretrained`` on ``device``."""
    import torch

    from sc_foundation.models.configuration import ScFoundationConfig
    from sc_foundation.models.export import export_pretrained, load_pretrained
    from sc_foundation.models.modeling import ScFoundationForMaskedValueModeling

    if not (directory / "config.json").exists():
        torch.manual_seed(seed)
        config = ScFoundationConfig.from_tokenizer(tokenizer, **model_config(size))
        export_pretrained(ScFoundationForMaskedValueModeling(config), tokenizer, directory)
    return load_pretrained(directory, device=device)


def parameter_counts(model) -> dict:
    backbone = model.base_model
    embeddings = sum(p.numel() for name, p in backbone.named_parameters() if "embed" in name)
    total = sum(p.numel() for p in backbone.parameters())
    return {"params_backbone": total, "params_backbone_non_embedding": total - embeddings}


def forward_flops(lengths: np.ndarray, model) -> float:
    """Useful forward FLOPs of the backbone over cells of ``lengths`` tokens: sum of ``2·N·L + 4·n·L²·d``."""
    config = model.config
    n_params = parameter_counts(model)["params_backbone_non_embedding"]
    lengths = lengths.astype(np.float64)
    return float(np.sum(2.0 * n_params * lengths + 4.0 * config.num_hidden_layers * lengths**2 * config.hidden_size))


def measure(model, adata, args, batch_size: int, mean_tokens: float, flops: float, precision: str = "auto") -> dict:
    """Warm-up then timed ``embed`` calls over all cells of ``adata`` (in memory, raw counts); ``flops`` is the
    useful forward FLOPs of one call."""
    import sc_foundation

    warmup = adata[: min(args.warmup_cells, adata.n_obs)].copy()
    sc_foundation.embed(warmup, model, batch_size=batch_size, progress=False, precision=precision)  # untimed
    seconds = []
    for _ in range(args.repeats):
        cells = adata.copy()
        started = time.perf_counter()
        sc_foundation.embed(cells, model, batch_size=batch_size, progress=False, precision=precision)
        seconds.append(time.perf_counter() - started)
    embedding = cells.obsm["X_sc_foundation"]
    median = statistics.median(seconds)
    return {
        "cells_per_s": adata.n_obs / median,
        "tokens_per_s": adata.n_obs * mean_tokens / median,
        "precision": cells.uns["sc_foundation"]["precision"],
        "achieved_flops_per_s": flops / median,
        "seconds": median,
        "seconds_all": seconds,
        "cells": adata.n_obs,
        "cells_embedded": int((~np.isnan(embedding).any(axis=1)).sum()),
        "embedding_width": int(embedding.shape[1]),
        "batch_size": batch_size,
        "mean_tokens_per_cell": mean_tokens,
        "match_rate": float(cells.uns["sc_foundation"]["match_rate"]),
        **parameter_counts(model),
    }


# ----------------------------------------------------------------------------------- published architectures
def write_published(name: str, directory: Path, adata, data_dir: Path, seed: int):
    """A random ``name`` checkpoint in its published layout and its reference forward: a function of a padded batch
    (``input_ids``, ``values``, ``attention_mask``) returning the source's cell embedding."""
    import torch

    sys.path.insert(0, str(REPO_ROOT))  # the references live with the tests that check the conversion against them
    from tests import published as stand_ins

    arch = PUBLISHED[name]
    if name == "scgpt":
        symbols = list(dict.fromkeys(adata.var_names))
        filler = [f"UNUSED{i}" for i in range(arch["vocab_size"] - len(symbols) - len(stand_ins.SCGPT_SPECIALS))]
        sizes = {key: value for key, value in arch.items() if key != "vocab_size"}
        reference = stand_ins.write_scgpt_folder(directory, symbols + filler, seed=seed, **sizes)

        def forward(batch):
            hidden = reference(batch["input_ids"], batch["values"], ~batch["attention_mask"])[-1]
            return torch.nn.functional.normalize(hidden[:, 0], dim=-1)  # scGPT's <cls>, L2-normalised

        return forward
    tokens = stand_ins.geneformer_v1_tokens(data_dir)
    bert, _ = stand_ins.write_geneformer_folder(directory, tokens, seed=seed, **arch)

    def forward(batch):
        mask = batch["attention_mask"]
        hidden = bert.bert(input_ids=batch["input_ids"], attention_mask=mask.long(), output_hidden_states=True)
        second_to_last = hidden.hidden_states[-2]  # Geneformer's EmbExtractor: mean of the second-to-last layer
        return (second_to_last * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)

    return forward


def padded_batches(tokenizer, adata, batch_size: int) -> list[dict]:
    """The cells tokenized by ``tokenizer``, length-sorted and padded in batches of ``batch_size`` (as ``embed``)."""
    import scipy.sparse as sp
    import torch

    from sc_foundation.data.tokenization import cell_keys, pad_cells

    counts = sp.csr_matrix(adata.X, dtype=np.float32)
    cells = tokenizer.encode(counts, tokenizer.match_genes(list(adata.var_names)), cell_keys(adata.obs_names))
    order = np.argsort(cells.lengths, kind="stable")
    batches = []
    for lo in range(0, len(order), batch_size):
        batch = pad_cells([cells.cell(i) for i in order[lo : lo + batch_size]], tokenizer.vocab.pad_id)
        batches.append({key: torch.from_numpy(value) for key, value in batch.items()})
    return batches


def time_forward(forward, batches) -> tuple[float, list]:
    """Seconds of ``forward`` over every batch (after one untimed warm-up batch) and its outputs."""
    import torch

    with torch.inference_mode():
        forward(batches[0])
        started = time.perf_counter()
        outputs = [forward(batch) for batch in batches]
    return time.perf_counter() - started, outputs


def measure_published(name: str, adata, args, directory: Path) -> dict:
    """Our backbone against the reference forward on the same batches, and ``embed`` end to end."""
    import torch

    import sc_foundation

    reference = write_published(name, directory, adata, args.data_dir, args.seed)
    model = sc_foundation.load_pretrained(directory, device="cpu")
    backbone = model.base_model
    batches = padded_batches(model.gene_tokenizer, adata, args.batch_size)
    ours_s, ours = time_forward(lambda batch: backbone(**batch).cell_embedding, batches)
    reference_s, theirs = time_forward(reference, batches)
    difference = max(float((a - b).abs().max()) for a, b in zip(ours, theirs, strict=True))
    tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
    embedded = adata.copy()
    started = time.perf_counter()
    sc_foundation.embed(embedded, model, batch_size=args.batch_size, progress=False)
    embed_s = time.perf_counter() - started
    return {
        "architecture": PUBLISHED[name],
        "cells": adata.n_obs,
        "mean_tokens_per_cell": tokens / adata.n_obs,
        "ours_forward_cells_per_s": adata.n_obs / ours_s,
        "reference_forward_cells_per_s": adata.n_obs / reference_s,
        "speedup": reference_s / ours_s,
        "embed_cells_per_s": adata.n_obs / embed_s,
        "max_abs_difference": difference,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        **parameter_counts(model),
    }


def format_table(payload: dict) -> str:
    head = (
        f"{'device':<6} {'size':<6} {'dtype':<5} {'params':>11} {'batch':>6} {'threads':>7} {'cells/s':>10} "
        f"{'tokens/s':>12} {'GFLOP/s':>9} {'of peak':>8}"
    )
    lines = [head, "-" * len(head)]
    rows = [("cpu", size, r) for size, by_dtype in payload["cpu"].items() for r in by_dtype.values()]
    rows += [("gpu", size, r) for size, r in payload["gpu"].items() if isinstance(r, dict) and "cells_per_s" in r]
    for device, size, r in rows:
        share = f"{r['share_of_peak']:>8.1%}" if "share_of_peak" in r else f"{'':>8}"
        lines.append(
            f"{device:<6} {size:<6} {r['precision']:<5} {r['params_backbone']:>11,} {r['batch_size']:>6} "
            f"{r.get('threads', ''):>7} {r['cells_per_s']:>10.1f} {r['tokens_per_s']:>12,.0f} "
            f"{r['achieved_flops_per_s'] / 1e9:>9.2f} {share}"
        )
    peak = payload["cpu_matmul_peak_flops_per_s"]
    lines.append(f"cpu matmul peak: fp32 {peak['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.1f} GFLOP/s")
    if not payload["gpu"]["measured"]:
        lines.append(f"gpu: not measured ({payload['gpu']['reason']})")
    for name, r in payload["published"].items():
        lines.append(
            f"{name}: ours {r['ours_forward_cells_per_s']:.1f} cells/s, reference "
            f"{r['reference_forward_cells_per_s']:.1f} cells/s ({r['speedup']:.2f}x), "
            f"embed() {r['embed_cells_per_s']:.1f} cells/s, {r['mean_tokens_per_cell']:.0f} tokens/cell, "
            f"max |diff| {r['max_abs_difference']:.1e}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    import anndata
    import torch

    from sc_foundation.training.hardware import cpu_has_fast_bf16, matmul_flops_per_s

    args = parse_args(argv)
    threads = args.threads or usable_cpus()
    torch.set_num_threads(threads)
    machine = machine_info() | {"fast_bf16": cpu_has_fast_bf16()}
    slice_path = cells_slice(args)
    store, store_info = tokenizer_store(slice_path, args)
    tokenizer = store.tokenizer
    adata = anndata.read_h5ad(slice_path)
    mean_tokens = store_info["mean_tokens_per_cell"]
    lengths = store.obs["length"].to_numpy()  # each embedded cell's tokens, as embed() tokenizes it

    def matmul_peak() -> dict[str, float]:
        return {
            name: max(matmul_flops_per_s(dtype, size, seconds=0.5) for size in PEAK_SIZES)
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
        }

    peak = matmul_peak()  # measured again after the models; the higher of the two counts (a shared machine)
    built = "reused" if store_info["reused"] else f"built in {store_info['seconds']:.1f} s"
    print(
        f"inference benchmark: {adata.n_obs:,} {args.dataset} cells at context {args.context} (store {built}), "
        f"{mean_tokens:.0f} tokens per cell on average, vocabulary {len(tokenizer.vocab):,}, CPU batch "
        f"{args.batch_size}, {threads} torch threads, {args.repeats} timed call(s) per model",
        flush=True,
    )
    gpu_measured = torch.cuda.is_available() and not args.no_gpu
    cpu_results: dict = {}
    gpu_results: dict = {
        "measured": gpu_measured,
        "reason": None if gpu_measured else ("--no-gpu" if args.no_gpu else "CUDA not available"),
    }
    if gpu_measured:
        gpu_results["device_name"] = torch.cuda.get_device_name(0)
        gpu_results["dtype"] = "bfloat16 autocast (embed's own on CUDA)"
    with tempfile.TemporaryDirectory(prefix="inference-bench-", dir=args.cache_dir) as exports:
        for size in args.sizes:
            directory = Path(exports) / size
            model = load_model(size, tokenizer, directory, "cpu", args.seed)
            flops = forward_flops(lengths, model)
            cpu_results[size] = {}
            for precision in () if args.no_cpu else ("fp32", "bf16"):
                result = measure(model, adata, args, args.batch_size, mean_tokens, flops, precision)
                result |= {"threads": torch.get_num_threads(), "device": "cpu"}
                cpu_results[size][precision] = result
                print(f"cpu {size} {precision}: {result['cells_per_s']:.1f} cells/s", flush=True)
            del model
            if gpu_measured:
                model = load_model(size, tokenizer, directory, "cuda", args.seed)
                gpu_results[size] = {
                    **measure(model, adata, args, args.gpu_batch_size, mean_tokens, forward_flops(lengths, model)),
                    "device": "cuda",
                }
                print(f"gpu {size}: {gpu_results[size]['cells_per_s']:.1f} cells/s", flush=True)
                del model
                torch.cuda.empty_cache()
        published = {}
        for name in args.published:
            cells = adata[: min(args.published_cells, adata.n_obs)].copy()
            published[name] = measure_published(name, cells, args, Path(exports) / name)
            print(f"cpu {name}: {published[name]['ours_forward_cells_per_s']:.1f} cells/s", flush=True)
    peak = {name: max(rate, again) for (name, rate), again in zip(peak.items(), matmul_peak().values(), strict=True)}
    for by_precision in cpu_results.values():
        for precision, result in by_precision.items():
            result["share_of_peak"] = result["achieved_flops_per_s"] / peak[precision]
    machine["load_average_after_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    payload = {
        "machine": machine,
        "config": {
            "dataset": args.dataset,
            "cells": adata.n_obs,
            "context": args.context,
            "encoding": tokenizer.config.encoding,
            "vocab_size": len(tokenizer.vocab),
            "mean_tokens_per_cell": mean_tokens,
            "batch_size": args.batch_size,
            "gpu_batch_size": args.gpu_batch_size,
            "torch_threads": torch.get_num_threads(),
            "warmup_cells": min(args.warmup_cells, adata.n_obs),
            "repeats": args.repeats,
            "seed": args.seed,
            "min_cells_per_gene": args.min_cells_per_gene,
            "sizes": {size: model_config(size) for size in args.sizes},
            "store": store_info,
            "slice": str(slice_path),
        },
        "cpu_matmul_peak_flops_per_s": peak,
        "cpu": cpu_results,
        "gpu": gpu_results,
        "published": published,
    }
    write_json_atomic(args.out, payload)
    print(format_table(payload))
    print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
