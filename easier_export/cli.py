"""The `easier-export` command line: thin wrappers over the Python API, one-line errors, exit codes.

Exit codes: 0 ok, 2 usage or bad input, 3 ONNX verification failed, 130 interrupted (state kept).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import click
import typer

from .errors import EXIT_USAGE, UserError, VerificationError
from .ui import console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Make trained vision networks shallower (EASIER) and ship them as verified, fast ONNX.")

ModelArg = Annotated[str, typer.Argument(help="timm:NAME, torchvision:NAME, builtin name, state dict, .pt2, "
                                              "linearized.pt, or pickled module (with --trust-pickle)")]
Weights = Annotated[Path | None, typer.Option(help="state dict for a named architecture")]
Arch = Annotated[str | None, typer.Option(help="architecture of a state-dict MODEL file, e.g. timm:resnet18")]
NumClasses = Annotated[int | None, typer.Option(help="re-head the model to this many classes")]
TrustPickle = Annotated[bool, typer.Option(help="allow loading a pickled nn.Module (runs code from the file)")]
Data = Annotated[Path, typer.Option(help="ImageFolder root with train/ and val/")]
InputSize = Annotated[int | None, typer.Option(help="square input size (default: the model's config)")]
Mean = Annotated[str | None, typer.Option(help="normalisation mean, e.g. 0.49,0.48,0.45")]
Std = Annotated[str | None, typer.Option(help="normalisation std")]
BatchSize = Annotated[int, typer.Option(help="batch size for finetuning and entropy passes")]
Workers = Annotated[int, typer.Option(help="data-loading worker processes")]
Out = Annotated[Path, typer.Option(help="output directory")]
Device = Annotated[str, typer.Option(help="auto, cpu or cuda[:N]")]
Rectifiers = Annotated[str, typer.Option(help="which activations count, comma list of "
                                              "relu,relu6,leaky_relu,gelu,silu,hardswish")]


def _floats(text: str | None, what: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--{what} takes comma-separated numbers, got '{text}'") from None


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--{what} takes comma-separated integers, got '{text}'") from None
    if min(values) < 1:
        raise UserError(f"--{what} takes positive integers, got '{text}'")
    return values


def _target(value: str) -> str:
    """The fold planner times merges on this device: timing a CUDA plan on the CPU would mislead it."""
    from .bench import cuda_usable

    if _choice(value, ("cpu", "cuda"), "target") == "cuda" and not cuda_usable():
        raise UserError("--target cuda needs a usable GPU (torch.cuda and onnxruntime's CUDA provider)")
    return value


def _devices(text: str) -> tuple[str, ...]:
    devices = tuple(d.strip() for d in text.split(","))
    for d in devices:
        _choice(d, ("cpu", "cuda"), "bench-devices")
    return devices


def _positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def _load(model: str, weights: Path | None, arch: str | None, num_classes: int | None, trust_pickle: bool,
          input_size: int | None, mean: str | None, std: str | None):
    from .models import load_model

    loaded = load_model(model, num_classes, weights, arch, trust_pickle, input_size)
    for note in loaded.notes:
        console.print(f"[yellow]warning:[/] {note}")
    loaded.mean = _floats(mean, "mean") or loaded.mean
    loaded.std = _floats(std, "std") or loaded.std
    if len(loaded.mean) != loaded.input_size[0] or len(loaded.std) != loaded.input_size[0]:
        raise UserError(f"--mean/--std need {loaded.input_size[0]} values (one per input channel)")
    return loaded


def _loaders(loaded, data: Path, batch_size: int, workers: int, seed: int = 0):
    from .data import image_folder

    return image_folder(data, loaded.input_size, loaded.mean, loaded.std, batch_size, workers, seed,
                        loaded.num_classes)


def _loop_config(max_drop: float, finetune_epochs: float, lr: float, max_removed: int | None,
                 one_shot: int | None, criterion: str, rectifiers: str, entropy_batches: int | None,
                 entropy_mode: str, threshold: float, seed: int, baseline_epochs: float = 0.0,
                 relocate_padding: bool = False, select: str = "entropy", patience: int = 2,
                 target_speedup: float | None = None):
    from .linearize import LoopConfig

    return LoopConfig(max_drop=max_drop, finetune_epochs=finetune_epochs, lr=lr, max_removed=max_removed,
                      one_shot=one_shot, criterion=criterion,
                      rectifiers=tuple(sorted(r.strip() for r in rectifiers.split(","))),
                      entropy_batches=entropy_batches, entropy_mode=entropy_mode, threshold=threshold, seed=seed,
                      relocate_padding=relocate_padding, baseline_epochs=baseline_epochs, select=select,
                      patience=patience, target_speedup=target_speedup)


MaxDrop = Annotated[float, typer.Option(help="accuracy budget: largest allowed top-1 drop, in points")]
Epochs = Annotated[float, typer.Option(help="finetuning epochs per round (fractions allowed)")]
Lr = Annotated[float, typer.Option(help="finetuning learning rate (SGD, cosine)")]
MaxRemoved = Annotated[int | None, typer.Option(help="stop after removing this many activations")]
OneShot = Annotated[int | None, typer.Option(help="remove the K lowest-entropy activations at once")]
Criterion = Annotated[str, typer.Option(help="entropy, sparsity or random")]
EntropyBatches = Annotated[int | None, typer.Option(help="batches per entropy pass (default 20)")]
EntropyMode = Annotated[str, typer.Option(help="train (as EASIER does) or eval mode for entropy passes")]
Threshold = Annotated[float, typer.Option(help="a unit is ON when its pre-activation is >= this")]
Seed = Annotated[int, typer.Option(help="random seed")]
RelocatePadding = Annotated[bool, typer.Option(help="move a conv's padding onto the conv before a removed "
                                                      "activation, so the two can later merge exactly")]
BaselineEpochs = Annotated[float, typer.Option(help="finetune the original this long first, so the budget is "
                                                    "measured from a model adapted to DATA")]
Select = Annotated[str, typer.Option(help="entropy: one activation per round, lowest score first (EASIER); "
                                          "latency: the fold group (activations whose joint removal completes a "
                                          "merge) with the least score per microsecond saved on --target")]
Patience = Annotated[int, typer.Option(help="over-budget candidates in a row (each reverted, then the next one "
                                            "tried) before the run ends; 0 stops at the first")]
TargetSpeedup = Annotated[float | None, typer.Option(help="stop once the shipped model measures at least this "
                                                          "ORT speed-up over the original on --target")]
Fold = Annotated[str, typer.Option(help="auto (only merges measured faster), all, or none")]
Target = Annotated[str, typer.Option(help="device the fold planner measures on: cpu or cuda")]
BenchDevices = Annotated[str, typer.Option(help="benchmark devices, comma list of cpu,cuda")]
BenchBatches = Annotated[str, typer.Option(help="benchmark batch sizes, comma list")]
Threads = Annotated[int | None, typer.Option(help="onnxruntime intra-op threads (default: physical cores)")]
NoSimplify = Annotated[bool, typer.Option("--no-simplify", help="skip onnxsim")]


@app.command()
def compress(model: ModelArg, data: Data, out: Out = Path("runs/compress"), weights: Weights = None,
             arch: Arch = None, num_classes: NumClasses = None, trust_pickle: TrustPickle = False,
             input_size: InputSize = None, mean: Mean = None, std: Std = None, batch_size: BatchSize = 128,
             workers: Workers = 2, device: Device = "auto", max_drop: MaxDrop = 1.0, finetune_epochs: Epochs = 1.0,
             lr: Lr = 0.01, max_removed: MaxRemoved = None, one_shot: OneShot = None,
             criterion: Criterion = "entropy", rectifiers: Rectifiers = "relu,relu6,leaky_relu,gelu,silu,hardswish",
             entropy_batches: EntropyBatches = 20, entropy_mode: EntropyMode = "train", threshold: Threshold = 0.0,
             seed: Seed = 0, baseline_epochs: BaselineEpochs = 0.0, relocate_padding: RelocatePadding = False,
             select: Select = "latency", patience: Patience = 2, target_speedup: TargetSpeedup = None,
             fold: Fold = "auto", target: Target = "cpu",
             bench_devices: BenchDevices = "cpu",
             bench_batches: BenchBatches = "1,8", threads: Threads = None, no_simplify: NoSimplify = False) -> None:
    """Run the whole pipeline: entropy → linearize/finetune rounds → fold → ONNX → verify → bench → report."""
    from .pipeline import CompressConfig
    from .pipeline import compress as run

    loop = _loop_config(max_drop, finetune_epochs, lr, max_removed, one_shot, criterion, rectifiers,
                        entropy_batches, entropy_mode, threshold, seed, baseline_epochs, relocate_padding,
                        select, patience, target_speedup)
    cfg = CompressConfig(loop, _choice(fold, ("auto", "all", "none"), "fold"),
                         _target(target), device, not no_simplify,
                         bench_devices=_devices(bench_devices), bench_batches=_ints(bench_batches, "bench-batches"),
                         threads=threads)
    _positive(batch_size=batch_size, input_size=input_size, threads=threads)
    with _distributed(device):
        loaded = _load(model, weights, arch, num_classes, trust_pickle, input_size, mean, std)
        run(loaded, _loaders(loaded, data, batch_size, workers, seed), out, cfg)
    console.print(f"outputs in [bold]{out}[/]")


def _choice(value: str, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise UserError(f"--{what} must be one of {', '.join(choices)}, got '{value}'")
    return value


class _distributed:
    """Initialise torch.distributed when launched by torchrun (WORLD_SIZE set), tear it down after."""

    def __init__(self, device: str) -> None:
        self.device = device

    def __enter__(self) -> None:
        import os

        import torch.distributed as dist

        self.owner = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
        if self.owner:
            import torch

            backend = "nccl" if torch.cuda.is_available() and self.device != "cpu" else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend)

    def __exit__(self, *exc: object) -> None:
        import torch.distributed as dist

        if self.owner:
            dist.destroy_process_group()


@app.command()
def entropy(model: ModelArg, data: Data, out: Annotated[Path, typer.Option(help="JSON file")] = Path("entropy.json"),
            plot: Annotated[Path | None, typer.Option(help="also draw the per-site entropy to this PNG")] = None,
            weights: Weights = None, arch: Arch = None, num_classes: NumClasses = None,
            trust_pickle: TrustPickle = False, input_size: InputSize = None, mean: Mean = None, std: Std = None,
            batch_size: BatchSize = 128, workers: Workers = 2, device: Device = "auto",
            rectifiers: Rectifiers = "relu,relu6,leaky_relu,gelu,silu,hardswish",
            entropy_batches: EntropyBatches = 20, entropy_mode: EntropyMode = "train",
            threshold: Threshold = 0.0, target: Target = "cpu", threads: Threads = None,
            groups: Annotated[bool, typer.Option(help="also time and list the fold groups: activations whose "
                                                      "joint removal completes a merge")] = True) -> None:
    """Measure the per-unit binary entropy of every activation call site and print the table (and fold groups)."""
    from rich.table import Table

    from .entropy import measure
    from .graph import find_call_sites, trace
    from .io import save_json
    from .report import plot_entropy
    from .train import resolve_device
    from .ui import progress

    _positive(batch_size=batch_size, input_size=input_size, entropy_batches=entropy_batches, threads=threads)
    if entropy_mode not in ("train", "eval"):
        raise UserError(f"--entropy-mode is train or eval, not {entropy_mode!r}")
    loaded = _load(model, weights, arch, num_classes, trust_pickle, input_size, mean, std)
    loaders = _loaders(loaded, data, batch_size, workers)
    dev = resolve_device(device)
    gm = trace(loaded.model).to(dev)
    sites = find_call_sites(gm, [r.strip() for r in rectifiers.split(",")])
    with progress("entropy", min(entropy_batches or len(loaders.train), len(loaders.train))) as advance:
        stats = measure(gm, sites, loaders.train, dev, entropy_batches, entropy_mode == "train", threshold, advance)
    rows = [s.to_dict() for s in stats.values()]
    table = Table("#", "call site", "op", "units", "entropy (bits)", "mean p_on", title=f"{model}: entropy")
    for i, r in enumerate(rows):
        table.add_row(str(i), r["name"], r["op"], str(r["units"]), f"{r['entropy']:.4f}", f"{r['mean_p_on']:.3f}")
    console.print(table)
    found = _fold_groups(gm, sites, loaded.input_size, stats, _target(target), threads) if groups else []
    save_json({"model": model, "mode": entropy_mode, "sites": rows, "groups": found}, out)
    if plot is not None:
        plot_entropy([{**r, "removed_round": None} for r in rows], plot)
    console.print(f"wrote {out}" + (f" and {plot}" if plot else ""))


@app.command()
def linearize(model: ModelArg, data: Data, out: Out = Path("runs/linearize"), weights: Weights = None,
              arch: Arch = None, num_classes: NumClasses = None, trust_pickle: TrustPickle = False,
              input_size: InputSize = None, mean: Mean = None, std: Std = None, batch_size: BatchSize = 128,
              workers: Workers = 2, device: Device = "auto", max_drop: MaxDrop = 1.0,
              finetune_epochs: Epochs = 1.0, lr: Lr = 0.01, max_removed: MaxRemoved = None,
              one_shot: OneShot = None, criterion: Criterion = "entropy",
              rectifiers: Rectifiers = "relu,relu6,leaky_relu,gelu,silu,hardswish",
              entropy_batches: EntropyBatches = 20, entropy_mode: EntropyMode = "train",
              threshold: Threshold = 0.0, seed: Seed = 0, baseline_epochs: BaselineEpochs = 0.0,
              relocate_padding: RelocatePadding = False, select: Select = "entropy", patience: Patience = 2,
              target: Target = "cpu", threads: Threads = None) -> None:
    """Only the EASIER loop: writes linearized.pt (resumable; rerun to continue)."""
    from .fold.planner import LatencyTable
    from .graph import trace
    from .linearize import run_loop
    from .pipeline import check_continuation, ensure_writable, save_linearized
    from .train import is_main_process, resolve_device

    cfg = _loop_config(max_drop, finetune_epochs, lr, max_removed, one_shot, criterion, rectifiers,
                       entropy_batches, entropy_mode, threshold, seed, baseline_epochs, relocate_padding,
                       select, patience)
    _positive(batch_size=batch_size, input_size=input_size, threads=threads)
    _target(target)
    with _distributed(device):
        loaded = _load(model, weights, arch, num_classes, trust_pickle, input_size, mean, std)
        check_continuation(loaded, cfg.relocates)
        loaders = _loaders(loaded, data, batch_size, workers, seed)
        table = LatencyTable(target, threads, ensure_writable(out) / "latency_table.json")
        result = run_loop(trace(loaded.model), loaded.source, loaders.train, loaders.val, cfg,
                          resolve_device(device), out, table)
        if is_main_process():
            save_linearized(out / "linearized.pt", loaded, result, cfg.relocates)
            console.print(f"removed {len(result.removed)} activations, top-1 {result.base_top1:.2f}% → "
                          f"{result.final_top1:.2f}%; wrote {out / 'linearized.pt'}")


@app.command()
def fold(model: ModelArg, out: Out = Path("runs/fold"),
         linearized: Annotated[Path | None, typer.Option(help="linearized.pt from `linearize`/`compress` "
                                                              "(replaces MODEL)")] = None,
         weights: Weights = None, arch: Arch = None, num_classes: NumClasses = None,
         trust_pickle: TrustPickle = False, input_size: InputSize = None, mode: Fold = "auto",
         target: Target = "cpu", threads: Threads = None, no_simplify: NoSimplify = False) -> None:
    """Fold a (linearized) model: writes folded.pt2, model.onnx (verified) and fold_plan.json."""
    import torch

    from .fold import fold_model
    from .graph import trace
    from .io import atomic_write, save_json
    from .pipeline import CompressConfig, ensure_writable, export_and_verify

    source = str(linearized) if linearized is not None else model
    loaded = _load(source, weights, arch, num_classes, trust_pickle, input_size, None, None)
    ensure_writable(out)
    example = torch.randn(1, *loaded.input_size)
    gm = trace(loaded.model)
    folded, records = fold_model(gm, example, mode=_choice(mode, ("auto", "all", "none"), "mode"),
                                 target=_target(target), cache=out / "latency_table.json",
                                 threads=threads)
    save_json([r.to_dict() for r in records], out / "fold_plan.json")
    program = torch.export.export(folded, (example.expand(2, *example.shape[1:]),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    atomic_write(out / "folded.pt2", lambda p: torch.export.save(program, p))
    inputs = _random_batches(loaded.input_size)
    cfg = CompressConfig(simplify=not no_simplify)
    exported = export_and_verify(folded, gm, example, out / "model.onnx", inputs, {"source": source}, cfg)
    applied = sum(r.applied for r in records)
    console.print(f"{applied} of {len(records)} folds applied; wrote {out}/folded.pt2, {out}/fold_plan.json")
    if not exported["verify"]["passed"]:
        raise VerificationError(f"folded ONNX does not reproduce the model: {exported['verify']['reason']}")


@app.command()
def export(model: ModelArg, out: Annotated[Path, typer.Option(help="ONNX file")] = Path("model.onnx"),
           weights: Weights = None, arch: Arch = None, num_classes: NumClasses = None,
           trust_pickle: TrustPickle = False, input_size: InputSize = None, mean: Mean = None, std: Std = None,
           data: Annotated[Path | None, typer.Option(help="verify on these val/ images instead of random "
                                                         "inputs")] = None,
           atol: Annotated[float, typer.Option(help="verification absolute tolerance")] = 1e-4,
           rtol: Annotated[float, typer.Option(help="verification relative tolerance")] = 1e-3,
           min_top1: Annotated[float, typer.Option(help="minimum top-1 agreement")] = 0.99,
           no_simplify: NoSimplify = False) -> None:
    """Export any loadable model to one verified ONNX file (no compression)."""

    from .pipeline import CompressConfig, export_and_verify, val_batches

    loaded = _load(model, weights, arch, num_classes, trust_pickle, input_size, mean, std)
    cfg = CompressConfig(simplify=not no_simplify, atol=atol, rtol=rtol, min_top1=min_top1)
    if data is not None:
        inputs = val_batches(_loaders(loaded, data, 16, 0), cfg.verify_batches)
    else:
        inputs = _random_batches(loaded.input_size)
    exported = export_and_verify(loaded.model, loaded.model, inputs[0][:1], out, inputs,
                                 {"source": loaded.source}, cfg)
    if not exported["verify"]["passed"]:
        raise VerificationError(f"{out} does not reproduce the model: {exported['verify']['reason']} "
                                f"(kept as {exported['path']})")
    console.print(f"wrote {out} ({exported['size_bytes'] / 1e6:.2f} MB, {exported['exporter']} exporter)")


@app.command()
def bench(models: Annotated[list[Path], typer.Argument(help="ONNX files to compare (the first is the baseline)")],
          device: Annotated[str, typer.Option(help="comma list of cpu,cuda")] = "cpu",
          batch: Annotated[str, typer.Option(help="comma list of batch sizes")] = "1,8",
          threads: Threads = None,
          seconds: Annotated[float, typer.Option(help="time budget per model and setting")] = 2.0,
          json_out: Annotated[Path | None, typer.Option("--json", help="also write the rows here")] = None) -> None:
    """Latency of ONNX models with onnxruntime: p50/p90, interleaved, speed-up vs the first."""
    import onnx

    from .bench import bench as run_bench
    from .io import save_json
    from .report import bench_table

    for path in models:
        if not path.is_file():
            raise UserError(f"no such file: {path}")
    try:
        proto = onnx.load(str(models[0]), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError for a file that is not ONNX
        raise UserError(f"{models[0]} is not an ONNX model ({type(e).__name__})") from None
    shape = _static_input_shape(proto)
    labels = {path.stem if path.stem not in {p.stem for p in models if p != path} else str(path): path
              for path in models}
    rows = run_bench(labels, shape, tuple(device.split(",")), _ints(batch, "batch"), threads,
                     max_seconds=seconds)
    console.print(bench_table(rows, baseline=next(iter(labels))))
    if json_out is not None:
        save_json(rows, json_out)


def _fold_groups(gm, sites: list, input_size: tuple[int, int, int], stats: dict, target: str,
                 threads: int | None) -> list[dict]:
    """Time the fold groups on ``target`` and print them, cheapest risk per microsecond first."""
    import torch
    from rich.table import Table

    from .fold.groups import find_groups
    from .fold.planner import LatencyTable

    names = [s.name for s in sites if s.in_graph]
    found = find_groups(gm.cpu().eval(), names, torch.zeros(1, *input_size), LatencyTable(target, threads))
    rows = [{"sites": list(g.sites), "entropy": sum(stats[s].entropy for s in g.sites), "us_saved": g.us_saved,
             "detail": g.detail} for g in found.candidates(set())]
    rows.sort(key=lambda r: r["entropy"] / r["us_saved"])
    table = Table("group", "call sites", "entropy (sum)", f"µs saved ({target}, batch 1)", "merge",
                  title="fold groups (latency selection order)")
    for i, r in enumerate(rows):
        table.add_row(str(i), ", ".join(r["sites"]), f"{r['entropy']:.4f}", f"{r['us_saved']:.1f}", r["detail"])
    console.print(table if rows else "no fold group saves time on this target")
    return rows


def _random_batches(input_size: tuple[int, int, int]) -> list:
    """Seeded stand-ins for validation images when verifying without --data."""
    import torch

    return [torch.randn(4, *input_size, generator=torch.Generator().manual_seed(i)) for i in range(2)]


def _static_input_shape(proto) -> tuple[int, int, int]:
    dims = proto.graph.input[0].type.tensor_type.shape.dim[1:]
    if not all(d.dim_value > 0 for d in dims):
        raise UserError("the ONNX input needs static non-batch dimensions to be benchmarked")
    return tuple(d.dim_value for d in dims)  # type: ignore[return-value]


@app.command()
def demo(out: Out = Path("runs/demo"), epochs: Annotated[int, typer.Option(help="training epochs")] = 12,
         finetune_epochs: Epochs = 1.0, max_drop: MaxDrop = 1.0, fold: Fold = "auto", seed: Seed = 0,
         select: Select = "latency") -> None:
    """Train a small inverted-residual CNN on scikit-learn's digits, then run the whole `compress` pipeline."""
    from .demo import run_demo

    run_demo(out, epochs, finetune_epochs, max_drop, _choice(fold, ("auto", "all", "none"), "fold"), seed, select)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: maps errors to exit codes with one line, never a traceback."""
    command = typer.main.get_command(app)
    try:
        command.main(args=argv, prog_name="easier-export", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(EXIT_USAGE)
    except (click.exceptions.Abort, KeyboardInterrupt):
        console.print("[yellow]interrupted[/]: finished rounds are saved; rerun the same command to resume")
        sys.exit(130)
    except (UserError, VerificationError) as e:
        console.print(f"[red]error:[/] {e}", soft_wrap=True)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
