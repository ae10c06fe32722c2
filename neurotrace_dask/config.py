"""Typed configuration for every stage.

One :class:`Config` object is what the CLI, notebooks and the Python API pass around.
Values come from, in increasing priority: the defaults below, a YAML file, and
command-line flags (given here as a nested ``overrides`` dict). Unknown keys and wrong
types are errors that name the key.

Examples
--------
>>> cfg = load_config(overrides={"convert": {"levels": 2}})
>>> cfg.convert.levels
2
>>> cfg.cluster.kind
'local'
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError

__all__ = [
    "ClusterConfig",
    "Config",
    "ConvertConfig",
    "LocalClusterConfig",
    "PredictConfig",
    "SlurmConfig",
    "SynthConfig",
    "AugmentConfig",
    "SelectConfig",
    "TraceConfig",
    "TrainConfig",
    "TrainVolume",
    "dump_config",
    "load_config",
]

PositiveInt = Annotated[int, Field(gt=0)]
Triple = tuple[PositiveInt, PositiveInt, PositiveInt]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
VoxelSize = tuple[
    Annotated[float, Field(gt=0, allow_inf_nan=False)],
    Annotated[float, Field(gt=0, allow_inf_nan=False)],
    Annotated[float, Field(gt=0, allow_inf_nan=False)],
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LocalClusterConfig(_Strict):
    """A ``distributed.LocalCluster`` on this machine.

    ``n_workers`` and ``threads_per_worker`` of ``None`` let distributed choose from
    the machine's cores. ``processes: false`` runs workers as threads of this process
    (quick start-up; for small volumes and notebooks); ``None`` lets the command choose:
    threads for ``convert`` alone (its reading, compressing and writing release the GIL),
    processes otherwise. ``host`` is the interface the scheduler and worker processes
    listen on. ``resources`` are advertised by every worker (``{"GPU": 1}`` gates GPU
    tasks; ``predict`` sets it itself on a GPU machine).
    """

    n_workers: PositiveInt | None = None
    threads_per_worker: PositiveInt | None = None
    processes: bool | None = None
    memory_limit: str = "auto"
    host: str = "127.0.0.1"
    resources: dict[str, float] = Field(default_factory=dict)


class SlurmConfig(_Strict):
    """A SLURM allocation through ``dask_jobqueue.SLURMCluster`` (extra ``[slurm]``).

    Every field maps onto the ``SLURMCluster`` argument of the same name, except
    ``jobs`` (fixed number of jobs) and ``adapt_minimum_jobs`` / ``adapt_maximum_jobs``
    (adaptive scaling, used when ``adapt_maximum_jobs`` is set).
    """

    queue: str | None = None
    account: str | None = None
    cores: PositiveInt = 8
    processes: PositiveInt = 1
    memory: str = "32GB"
    walltime: str = "04:00:00"
    # Workers retire before the walltime kills them, staggered so they don't all go at once.
    lifetime: str | None = "3h50m"
    lifetime_stagger: str | None = "5m"
    local_directory: str | None = None
    log_directory: str | None = None
    job_extra_directives: list[str] = Field(default_factory=list)
    job_script_prologue: list[str] = Field(default_factory=list)
    jobs: Annotated[int, Field(ge=0)] = 1
    adapt_minimum_jobs: Annotated[int, Field(ge=0)] = 0
    adapt_maximum_jobs: PositiveInt | None = None


class ClusterConfig(_Strict):
    """Where the Dask work runs: ``local`` (default), an existing scheduler ``address``, or ``slurm``."""

    kind: Literal["local", "address", "slurm"] = "local"
    address: str | None = None
    connect_timeout: str = "20s"
    # The dashboard is reachable from this machine only unless configured otherwise.
    dashboard_address: str = "127.0.0.1:8787"
    local: LocalClusterConfig = Field(default_factory=LocalClusterConfig)
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)
    # Block tasks in flight per worker thread: bounds scheduler memory on huge grids.
    tasks_per_thread: PositiveInt = 4

    @model_validator(mode="after")
    def _address_given(self) -> ClusterConfig:
        if self.kind == "address" and not self.address:
            raise ValueError("cluster.kind is 'address' but cluster.address is not set")
        return self


class ConvertConfig(_Strict):
    """Options of ``neurotrace convert`` (any supported stack -> OME-Zarr).

    ``chunks`` of ``None`` picks about 1-2 MB per chunk; ``shards`` (a multiple of
    ``chunks``) groups chunks into one file each. ``levels`` counts pyramid levels
    including full resolution (``None``: until the largest axis is at most 512).
    ``voxel_size`` (z, y, x in micrometres) overrides what the file says.
    ``rescale`` maps other dtypes (float, int16, uint32 ...) linearly from their finite
    range onto uint8 or uint16; without it such inputs are refused.
    """

    chunks: Triple | None = None
    shards: Triple | None = None
    levels: Annotated[int, Field(ge=1, le=12)] | None = None
    voxel_size: VoxelSize | None = None
    channel: Annotated[int, Field(ge=0)] | None = None
    rescale: Literal["uint8", "uint16"] | None = None
    compression_level: Annotated[int, Field(ge=0, le=9)] = 1
    # Target bytes of input one task reads and writes: bounds worker memory.
    task_bytes: Annotated[int, Field(ge=1 << 16)] = 64 << 20
    overwrite: bool = False

    @model_validator(mode="after")
    def _shards_multiple_of_chunks(self) -> ConvertConfig:
        if self.shards is not None and self.chunks is not None:
            if any(s % c for s, c in zip(self.shards, self.chunks)):
                raise ValueError(f"convert.shards {self.shards} must be a multiple of convert.chunks {self.chunks}")
        return self


class SynthConfig(_Strict):
    """Physics of ``neurotrace synth``: how a morphology becomes a fluorescence volume.

    Lengths are in micrometres unless named otherwise; light is counted in photons
    per voxel, before the camera's read noise and quantisation. ``intensity`` scales
    the neurite signal only (the noise model is unchanged): 1.0, 0.5, 0.25 and 0.125
    make the weak-neurite series. See :mod:`neurotrace_dask.synth` for the model.
    """

    voxel_size: VoxelSize = (1.0, 0.33, 0.33)
    bits: Literal[8, 16] = 8
    intensity: Positive = 1.0
    seed: Annotated[int, Field(ge=0)] = 0
    margin: NonNegative = 10.0  # around a single morphology, when the shape is fitted to it
    radius_floor: NonNegative = 0.6  # in xy voxels: thinner neurites are drawn this thick
    soma_brightness: NonNegative = 2.0  # relative to a neurite of brightness 1
    psf_sigma_xy: NonNegative = 0.15
    psf_sigma_z: NonNegative = 0.5
    branch_brightness_sigma: NonNegative = 0.35  # sigma of the lognormal per-branch brightness
    path_variation: Fraction = 0.3  # amplitude of the smooth variation along a branch
    path_variation_scale: Positive = 10.0  # its typical wavelength
    gap_rate: NonNegative = 0.5  # dim gaps per 100 um of cable
    gap_length: NonNegative = 2.0  # mean gap length
    gap_depth: Fraction = 0.1  # brightness left inside a gap
    weak_terminal_fraction: Fraction = 0.2  # terminal branches rendered weak
    weak_terminal_factor: Fraction = 0.25  # their brightness
    signal_photons: NonNegative = 40.0  # photons of a fully lit voxel of brightness 1, intensity 1
    background_photons: NonNegative = 3.0
    autofluorescence_photons: NonNegative = 2.0  # amplitude of the low-frequency background
    autofluorescence_scale: Positive = 15.0  # its spatial scale
    read_noise: NonNegative = 1.0  # camera read noise (standard deviation, photons)
    full_scale_photons: Positive = 64.0  # photons that map to the largest 8- or 16-bit value


class PredictConfig(_Strict):
    """Options of ``neurotrace predict`` (image OME-Zarr -> probability OME-Zarr).

    ``block`` is the write region of one task (rounded up to the output chunks/shards and
    the model stride); ``halo`` voxels of context are read around it (rounded up to the
    stride). A read region larger than ``patch`` voxels in total runs as overlapping
    patches of at most ``patch`` blended with a centre-weighted window. ``device`` ``auto``
    uses a GPU when torch sees one. On a GPU machine a local cluster becomes one
    single-threaded worker holding the GPU; on other clusters GPU tasks are gated on a
    ``GPU`` resource when every worker advertises one (``dask worker --resources GPU=1``,
    one worker per GPU with ``CUDA_VISIBLE_DEVICES`` set).
    """

    checkpoint: Path | None = None
    block: Triple = (64, 256, 256)
    halo: Annotated[int, Field(ge=0)] = 32
    patch: Triple = (128, 320, 320)
    patch_overlap: Annotated[int, Field(ge=0)] = 32
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: PositiveInt = 2  # patches per forward pass
    amp: bool = True  # mixed precision on GPU
    skip_background: bool = True  # blocks whose read region is all below the low percentile
    overwrite: bool = False


class TraceConfig(_Strict):
    """Options of ``neurotrace trace`` (voxel scooping by blocks, then stitching; see :mod:`neurotrace_dask.trace`).

    ``high`` / ``low`` are hysteresis thresholds on the 0-255 probability (applied after
    gap bridging: a dim fragment counts once bridged to a bright one). With ``raw``
    input the image is first scaled to that probability: the image smoothed with sigma 1
    voxel minus a Gaussian background of ``background_sigma`` um, in robust noise units,
    with ``k_low`` noise units mapped to ``low`` and ``k_high`` to ``high``. Lengths in um.
    """

    high: Annotated[float, Field(ge=0, le=255)] = 128.0
    low: Annotated[float, Field(ge=0, le=255)] = 64.0
    soma_radius: Positive = 2.5  # distance-transform depth of a soma
    scoop: Positive = 0.5  # scooping distance in local diameters
    spur_factor: NonNegative = 1.0  # prune terminal branches with less cable outside the tree (in local diameters)
    min_length: NonNegative = 3.0  # drop fragments with less cable and no soma
    smooth: bool = True  # 3-node moving average along paths
    bridge_distance: NonNegative = 6.0  # largest gap bridged; 0 disables bridging
    bridge_angle: Annotated[float, Field(ge=0, le=180)] = 60.0  # largest turn, degrees
    bridge_min_mean: Annotated[float, Field(ge=0, le=255)] = 32.0  # least mean probability along a bridge
    bridge_facing_distance: NonNegative = 9.0  # the same for two tips pointing at each other
    bridge_facing_min_mean: Annotated[float, Field(ge=0, le=255)] = 24.0
    bridge_short: NonNegative = 4.0  # bridges this short (um) need no probability along them
    bridge_dim: bool | None = None  # hysteresis after bridging; None: on, off for raw input
    extend: bool | None = None  # tip extension along the dim ridge; None: on, off for raw input
    extend_min_mean: Annotated[float, Field(ge=0, le=255)] = 44.0  # least mean probability of a kept extension
    extend_length: NonNegative = 20.0  # longest tip extension (um); 0 disables
    extend_link_min_mean: Annotated[float, Field(ge=0, le=255)] = 40.0  # the same for one that joins a fragment
    k_high: Positive = 8.0
    k_low: Positive = 4.0
    background_sigma: Positive = 3.0
    block: Triple | None = None  # voxels per task; None: one block up to 2**27 voxels, else 256^3
    halo: Annotated[int, Field(ge=1)] = 16  # context voxels around each block (hysteresis, somata)
    keep: Literal["all", "seeded", "largest"] = "all"  # neurons written: all, those grown from --seeds, the largest
    overwrite: bool = False

    @model_validator(mode="after")
    def _low_below_high(self) -> TraceConfig:
        if self.low > self.high:
            raise ValueError(f"trace.low {self.low} must not exceed trace.high {self.high}")
        if self.k_low > self.k_high:
            raise ValueError(f"trace.k_low {self.k_low} must not exceed trace.k_high {self.k_high}")
        return self


class AugmentConfig(_Strict):
    """Augmentation of training patches (``train.augment``); see :mod:`neurotrace_dask.train`.

    Geometric: flips of every axis and 90-degree rotations in the y-x plane only (voxels are
    anisotropic in z). Intensity, on the normalised patch: contrast ``scale`` and ``gamma``
    ranges, a brightness ``offset`` (+-), additive Gaussian ``noise`` and signal-dependent
    ``shot_noise`` (largest standard deviations, drawn per patch), and, with probability
    ``dim_probability``, dimming of the signal towards the background by a factor down to
    ``dim_min`` with fresh shot noise: weak neurites keep their labels.
    """

    flip: bool = True
    rotate90: bool = True
    scale: tuple[Positive, Positive] = (0.8, 1.25)
    gamma: tuple[Positive, Positive] = (0.7, 1.4)
    offset: NonNegative = 0.1
    noise: NonNegative = 0.05
    shot_noise: NonNegative = 0.1
    dim_probability: Fraction = 0.5
    dim_min: Annotated[float, Field(gt=0, le=1)] = 0.125


class TrainVolume(_Strict):
    """One training or validation volume: an image with a label mask or a gold SWC.

    ``image`` is any input ``neurotrace convert`` reads (TIFF, Zarr, OME-Zarr, HDF5); ``label``
    a mask of the same shape (non-zero = neurite); ``swc`` a gold tracing in the image's voxel
    coordinates, rendered to a radius-aware mask patch by patch. ``intensity`` < 1 dims the
    image with the renderer's camera model (``synth.dim_real_image``); ``region`` crops
    ``[[z0, z1], [y0, y1], [x0, x1]]``; ``voxel_size`` overrides the file's.
    """

    image: Path
    label: Path | None = None
    swc: Path | None = None
    voxel_size: VoxelSize | None = None
    intensity: Annotated[float, Field(gt=0, le=1)] = 1.0
    region: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None = None

    @model_validator(mode="after")
    def _has_truth(self) -> TrainVolume:
        if self.label is None and self.swc is None:
            raise ValueError(f"volume {self.image} needs a label mask or a gold swc")
        return self


class TrainConfig(_Strict):
    """Options of ``neurotrace train`` (see :mod:`neurotrace_dask.train`).

    Data: ``volumes`` (image + mask or gold SWC), a candidate ``pool`` written by
    :func:`neurotrace_dask.select.write_pool` (optionally only the names in a ``subset``
    CSV from ``neurotrace select``), and a ``synthetic_fraction`` of patches rendered on the
    fly with the ``synth`` section's physics. ``optimizer: sgd`` with lr 0.01, momentum 0.9,
    weight decay 3e-4 is the seed pipeline's recipe; ``adamw`` with ``schedule: cosine`` the
    other preset. ``threads`` caps torch's CPU threads (``null``: torch's default).
    """

    preset: Literal["small", "base"] = "base"
    init: Path | None = None  # fine-tune from this checkpoint (its architecture wins over preset)
    seed: Annotated[int, Field(ge=0)] = 0
    threads: PositiveInt | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True  # mixed precision on GPU
    voxel_size: VoxelSize = (1.0, 0.33, 0.33)  # recorded in the checkpoint; synthetic patches use it
    patch: Triple = (32, 64, 64)
    batch_size: PositiveInt = 4
    steps: PositiveInt = 2000
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: Positive = 0.01
    momentum: Fraction = 0.9
    weight_decay: NonNegative = 3e-4
    schedule: Literal["constant", "cosine", "poly"] = "constant"
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    normalisation: Literal["percentile", "robust"] = "robust"
    class_weight: Literal["foreground", "none"] = "foreground"  # seed: weights from the foreground fraction
    min_foreground_fraction: Annotated[float, Field(gt=0, le=0.5)] = 0.05  # caps the neurite weight
    dice_weight: NonNegative = 1.0
    aux_weight: NonNegative = 0.5  # deep supervision of the auxiliary heads
    skeleton_weight: NonNegative = 0.0
    ignore_untraced: NonNegative = 0.0
    foreground_bias: Fraction = 0.7  # share of patches centred near a neurite
    volumes: list[TrainVolume] = Field(default_factory=list)
    pool: Path | None = None
    subset: Path | None = None  # CSV with a `name` column (and optionally `selected`) from neurotrace select
    synthetic_fraction: Fraction = 0.0
    synthetic_neurons: PositiveInt = 2
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    validation: list[TrainVolume] = Field(default_factory=list)
    val_every: PositiveInt = 250
    out: Path = Path("runs/train")
    log_every: PositiveInt = 25
    tensorboard: bool = True  # when the tensorboard package is installed
    progress: bool = True
    overwrite: bool = False

    @model_validator(mode="after")
    def _patch_on_stride(self) -> TrainConfig:
        if any(n % 8 for n in self.patch):
            raise ValueError(f"train.patch {self.patch} must be a multiple of the model stride 8 on every axis")
        if self.subset is not None and self.pool is None:
            raise ValueError("train.subset names samples of train.pool, which is not set")
        return self


class SelectConfig(_Strict):
    """Options of ``neurotrace select`` (see :mod:`neurotrace_dask.select`).

    ``dhpr`` is the seed's rule: signal density (foreground voxels / ``density_scale``,
    clipped to 1), background noise (std), low-SNR ratio (foreground voxels with SNR below
    ``snr_threshold``); keep samples noisier than the median, rank by density + low-SNR ratio,
    take the top ``k``. ``dhpr+`` adds diversity (farthest-point sampling on image features,
    weight ``diversity``) and hardness (the loss of ``checkpoint`` on each sample, weight
    ``hardness_weight``). ``random`` draws ``k`` with ``seed``.
    """

    method: Literal["dhpr", "dhpr+", "random"] = "dhpr"
    k: PositiveInt = 300
    density_scale: Positive = 50000.0
    snr_threshold: Positive = 2.0
    diversity: Fraction = 0.5
    hardness_weight: NonNegative = 1.0
    checkpoint: Path | None = None  # model whose loss measures hardness (dhpr+)
    seed: Annotated[int, Field(ge=0)] = 0


class Config(_Strict):
    """Configuration of the whole pipeline; one section per stage."""

    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    convert: ConvertConfig = Field(default_factory=ConvertConfig)
    predict: PredictConfig = Field(default_factory=PredictConfig)
    synth: SynthConfig = Field(default_factory=SynthConfig)
    trace: TraceConfig = Field(default_factory=TraceConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _describe(error: ValidationError, source: str) -> str:
    parts = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            parts.append(f"unknown key '{key}'")
        else:
            parts.append(f"{key}: {item['msg']}")
    return f"{source}: " + "; ".join(parts)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of sections, not {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Build the configuration from defaults, an optional YAML file and overrides.

    Parameters
    ----------
    path
        YAML file with any subset of the sections of :class:`Config`.
    overrides
        Nested dict of values that win over the file (what CLI flags set).

    Raises
    ------
    ConfigError
        One line naming the file and each offending key.

    Examples
    --------
    >>> load_config(overrides={"cluster": {"kind": "address", "address": "tcp://h:8786"}}).cluster.address
    'tcp://h:8786'
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        data = _read_yaml(Path(path))
        source = str(path)
    if overrides:
        data = _deep_merge(data, overrides)
        source = f"{source} + command-line flags" if path is not None else "command-line flags"
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


def dump_config(config: Config) -> str:
    """The configuration as YAML text (what ``neurotrace config show`` prints).

    Examples
    --------
    >>> "cluster:" in dump_config(Config())
    True
    """
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
