"""``sae-gba synth`` and ``sae-gba bench``: synthetic experiments and benchmarks."""

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

from sae_gba.cli import checks
from sae_gba.cli.options import Job, QuietOption, UsageError, positional, repeated

SynthExperiment = Literal[
    "imbalanced",
    "resonance",
    "consistency",
    "longtail",
    "ablate",
    "planted",
    "wsae",
    "suite",
    "scaling",
]
Benchmark = Literal["throughput", "scaling"]


@dataclasses.dataclass(kw_only=True)
class SynthOptions(QuietOption):
    """``sae-gba synth``: synthetic feature-recovery experiments (JSON + PNG).

    Args:
        experiment: the experiment to run.
        out: JSON path (the PNG goes beside it).
        seeds: seeds per setting.
        workers: parallel training processes (default: all cores).
        variants: ablate only: comma-separated variant labels (default: all).
        methods: ablate: gba and/or gba_frozen_scale; suite: any of gba_default,
            gba_paper, topk_k1, topk_k2, batchtopk, l1; comma-separated (default:
            all).
        families: suite only: comma-separated data families (default: all).
        gba: suite/scaling: a GBATrainingSAEConfig field for gba_default as
            KEY=VALUE (repeatable).
        size: suite/scaling: default or small (seconds).
        data: ablate only: the data preset (default: imbalanced).
    """

    experiment: SynthExperiment = positional("EXPERIMENT")
    out: str
    seeds: int | None = None
    workers: int | None = None
    variants: str | None = None
    methods: str | None = None
    families: str | None = None
    gba: list[str] = repeated("KEY=VALUE")
    size: str | None = None
    data: Literal["imbalanced", "uniform", "longtail"] | None = None


def check_synth(opts: SynthOptions, command_line: str) -> Job:
    """Check ``sae-gba synth``'s request; return its job."""
    checks.positive("--seeds", opts.seeds, 2 if opts.experiment == "consistency" else 1)
    checks.positive("--workers", opts.workers)
    if opts.experiment in ("suite", "scaling"):
        return _check_synth_suite(opts)
    if opts.families or opts.gba or opts.size:
        raise UsageError("--families, --gba and --size apply to suite and scaling only")
    options: dict[str, Any] = {}
    if opts.workers is not None:
        options["workers"] = opts.workers
    for name in ("variants", "methods", "data"):
        value = getattr(opts, name)
        if value is not None:
            if opts.experiment != "ablate":
                raise UsageError(f"--{name} applies to ablate only")
            options[name] = value if name == "data" else value.split(",")
    out = checks.output_file("--out", opts.out)

    def run() -> None:
        from sae_gba.progress import progress_bars
        from sae_gba_evals.lab.experiments import run_experiment

        with progress_bars(not opts.quiet):
            result = run_experiment(opts.experiment, out, seeds=opts.seeds, **options)
        print(json.dumps(result, indent=1)[:4000])

    return run, None


def _check_synth_suite(opts: SynthOptions) -> Job:
    from sae_gba_evals.suite.methods import parse_gba_overrides

    parse_gba_overrides(opts.gba)  # a bad KEY=VALUE fails before any run
    out = checks.output_file("--out", opts.out)

    def run() -> None:
        from sae_gba.progress import progress_bars
        from sae_gba_evals.suite.suite import run_command

        with progress_bars(not opts.quiet):
            print(run_command(opts))

    return run, lambda: f"finished runs so far are in {out.with_suffix('.runs.jsonl')}"


@dataclasses.dataclass(kw_only=True)
class BenchOptions(QuietOption):
    """``sae-gba bench``: training throughput of GBA against SAELens's SAEs and
    sparsify at matched L0 (throughput) and of data-parallel training on 1 and 2
    ranks (scaling).

    Args:
        benchmark: the benchmark to run.
        out: JSON path (the PNG goes beside it).
        threads: torch threads (default: all cores).
        no_harvest: throughput: skip the embedded model's activation-harvest
            measurement.
        size: throughput: default (four shapes), small (640, 4096, 1024) or tiny (a
            check only); scaling: default or tiny.
        l0: throughput: comma-separated L0 points (default: 32,128).
        methods: throughput: comma-separated methods among gba, weighted_gba, topk,
            batchtopk, jumprelu, sparsify (default: all).
        device: scaling: cpu (gloo, 1 and 2 ranks) or cuda.
    """

    benchmark: Benchmark = positional("BENCHMARK")
    out: str
    threads: int | None = None
    no_harvest: bool = False
    size: str = "default"
    l0: str | None = None
    methods: str | None = None
    device: str = "cpu"


def check_bench(opts: BenchOptions, command_line: str) -> Job:
    """Check ``sae-gba bench``'s request; return its job."""
    checks.positive("--threads", opts.threads)
    out = checks.output_file("--out", opts.out)
    if opts.benchmark == "scaling":
        if opts.l0 is not None or opts.methods is not None:
            raise UsageError("--l0 and --methods apply to throughput only")
        return _check_bench_scaling(opts, out)
    from sae_gba_evals.bench.throughput import L0_POINTS, METHODS, SHAPES

    shapes = _choice("--size", opts.size, SHAPES)
    points = (
        L0_POINTS if opts.l0 is None else _l0_points(opts.l0, min(s[1] for s in shapes))
    )
    methods = METHODS if opts.methods is None else tuple(opts.methods.split(","))
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise UsageError(
            f"--methods {opts.methods!r} is invalid: must be comma-separated names "
            f"among {list(METHODS)}"
        )

    def run() -> None:
        from sae_gba.progress import progress_bars
        from sae_gba_evals.bench.throughput import run_throughput

        with progress_bars(not opts.quiet):
            result = run_throughput(
                out,
                shapes,
                points,
                methods,
                harvest=not opts.no_harvest,
                threads=opts.threads,
            )
        print(json.dumps(result["acceptance"], indent=1))
        print(f"wrote {out} and its PNG")

    return run, None


def _choice(flag: str, value: str, table: dict[str, Any]) -> Any:
    if value not in table:
        raise UsageError(f"{flag} {value!r} is invalid: must be one of {list(table)}")
    return table[value]


def _l0_points(text: str, d_sae: int) -> tuple[int, ...]:
    try:
        points = tuple(int(part) for part in text.split(","))
    except ValueError:
        points = ()
    if not points or not all(0 < p < d_sae for p in points):
        raise UsageError(
            f"--l0 {text!r} is invalid: must be comma-separated whole numbers "
            f"between 1 and {d_sae - 1} (the narrowest shape's d_sae minus one)"
        )
    return points


def _check_bench_scaling(opts: BenchOptions, out: Path) -> Job:
    from sae_gba_evals.bench.scaling import SHAPES

    _choice("--size", opts.size, SHAPES)
    checks.torch_device(opts.device)

    def run() -> None:
        from sae_gba_evals.bench.scaling import run_scaling

        ranks = (1,) if opts.device.startswith("cuda") else (1, 2)
        result = run_scaling(out, opts.size, opts.device, opts.threads, ranks)
        print(json.dumps(result["summary"], indent=1))
        print(f"sparsify: {result['sparsify']}")
        print(f"wrote {out}")

    return run, None
