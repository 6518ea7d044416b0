"""One typed config object for a run: YAML files and `--set KEY=VALUE` fill it, pydantic checks it.

Unknown keys and wrong types are refused here, before any worker starts."""

from __future__ import annotations

from typing import Annotated, Any, Union, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .errors import UserError
from .variants import NAMES as VARIANTS

PosInt = Field(gt=0)

# Upper bounds no real run needs: far beyond them a value is a typo (an extra digit, a unit) that would
# otherwise end in an overflow or an out-of-memory traceback deep in torch or numpy.
MAX_WIDTH = 65536        # units of one hidden layer (the paper's widest: 3000)
MAX_LAYERS = 64          # hidden layers of one network
MAX_CHANNELS = 4096      # channels of one conv layer
MAX_LATENT = 4096        # dimensions of z, of the universal approximator's noise
MAX_CLASSES = 10_000     # categories of y / prior components
MAX_STEPS = 10**12       # any count of steps or epochs
MAX_SAMPLES = 1 << 30    # any count of samples (batch, shuffle buffer, labelled subset, Parzen samples)
MAX_SCALE = 1e30         # learning rates and loss weights (Adam overflows float32 a little above 1e38)
MAX_SEED = 2**63 - 1
MAX_WORKERS = 100_000     # torch and numpy take non-negative seeds up to 64 bits


def layer_sizes(values, limit: int, what: str):
    """Hidden layer lists: one or more positive sizes, each at most `limit`, at most MAX_LAYERS of them."""
    if values is None:
        return values
    if not values or any(int(h) <= 0 for h in values):
        raise ValueError("needs one or more positive layer sizes")
    if len(values) > MAX_LAYERS:
        raise ValueError(f"at most {MAX_LAYERS} layers, got {len(values)}")
    if max(values) > limit:
        raise ValueError(f"{what} of at most {limit} each, got {max(values)}")
    return values


class Section(BaseModel):
    """Every section: unknown keys refused, assignments checked, and no float may be inf or nan."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(Section):
    path: str = Field("", description="dataset URL; empty = the embedded digits, sharded on first use")
    batch_size: int = Field(100, gt=0, le=MAX_SAMPLES, description="per worker")
    shuffle_buffer: int = Field(16384, ge=0, le=MAX_SAMPLES, description="samples shuffled together in a rank's buffer (0: shard order only)")
    prefetch: int = Field(2, ge=0, le=64, description="shards fetched ahead in background threads")
    cache_dir: Optional[str] = Field(None, description="local cache for remote shards")
    connections: int = Field(8, gt=0, le=1024, description="concurrent ranged requests per rank to object storage")
    request_bytes: int = Field(8 << 20, gt=0, le=1 << 32, description="bytes per ranged request to object storage (rounded to the 1 MiB checksum blocks)")
    labeled_per_class: Optional[int] = Field(None, gt=0, le=MAX_SAMPLES, description="keep labels of only this many samples per class (seeded; semi-supervised)")
    eval_split: str = Field("test", description="split the final metrics are computed on")




class NetworkSpec(Section):
    """A user's own network in LightningCLI's convention: the class to import and its keyword arguments."""

    class_path: Optional[str] = Field(None, description="pkg.module.Class of a torch.nn.Module to use instead of the built-in network "
                                      "(it must be importable where the workers run: submit --py-modules)")
    init_args: dict[str, Any] = Field({}, description="keyword arguments of the class; the shapes it may take (in_shape, in_features, "
                                      "out_shape, out_features) are passed by aae-dist")


NETWORK_KEYS = ("encoder", "decoder", "discriminator")  # model keys that may name a user's own network


def arch(default, **kw):
    """A model field the weights depend on: a checkpoint only resumes into a config that agrees on all of them."""
    return Field(default, json_schema_extra={"architecture": True}, **kw)


class ModelConfig(Section):
    variant: Literal[VARIANTS] = arch("basic", description="the paper's AAE variants (Sec. 2-7), see aae_dist/variants.py")
    regularizer: Literal["adversarial", "kl"] = arch("adversarial", description="kl: the VAE baseline (gaussian posterior)")
    num_classes: Optional[int] = arch(None, gt=1, le=MAX_CLASSES, description="K of the categorical y; default: the dataset's classes")
    cluster_head_distance: float = Field(2.0, ge=0, le=1e6, description="dim_reduction: cluster heads closer than this are pushed apart")
    cluster_head_weight: float = Field(1.0, ge=0, le=MAX_SCALE, description="dim_reduction: weight of the push between close cluster heads")
    cluster_heads: int = arch(1, ge=1, le=64, description="clustering / semi_supervised: y heads on one encoder trunk, each with its own y "
                              "terms; the decoder reads the first, the metrics report the head with the best unsupervised objective")
    kind: Literal["mlp", "conv"] = arch("mlp", description="network family: the paper's MLPs or strided convolutions")
    hidden: list[int] = arch([1000, 1000], description=f"hidden layer widths of encoder and decoder [each <= {MAX_WIDTH}, at most {MAX_LAYERS} layers]")
    disc_hidden: list[int] = arch([1000, 1000], description=f"hidden layer widths of the discriminators [each <= {MAX_WIDTH}, at most {MAX_LAYERS} layers]")
    latent_dim: int = arch(8, gt=0, le=MAX_LATENT, description="dimensions of the code z")
    posterior: Literal["deterministic", "gaussian", "universal"] = arch("deterministic", description="q(z|x): deterministic, gaussian (reparameterised) or universal (input noise)")
    noise_dim: int = arch(16, gt=0, le=MAX_LATENT, description="universal approximator: noise concatenated to the input")
    conv_channels: list[int] = arch([32, 64], description=f"conv: channels of each stride-2 layer [each <= {MAX_CHANNELS}, at most {MAX_LAYERS} layers]")
    output: Literal["auto", "bernoulli", "gaussian"] = Field("auto", description="auto: bernoulli (sigmoid+BCE) for uint8 pixels")
    encoder_hidden: Optional[list[int]] = arch(None, description=f"width per network; default: hidden [each <= {MAX_WIDTH}, at most {MAX_LAYERS} layers]")
    decoder_hidden: Optional[list[int]] = arch(None, description=f"decoder widths; default: hidden [each <= {MAX_WIDTH}, at most {MAX_LAYERS} layers]")
    batch_norm: bool = arch(False, description="batch norm in the encoder, its y and z outputs included (paper: clustering)")
    deskew: bool = arch(False, description="images: deskewed (slant and centre of mass normalised by their own moments) before the "
                        "encoder sees them, in training, evaluation and inference alike; the decoder then models upright digits")
    input_noise: float = Field(0.0, ge=0, le=1e6, description="std of Gaussian noise on the encoder's input, training only (paper: 0.3 semi-sup.)")
    input_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the encoder's input, training only (paper: 0.2 clustering)")
    init_std: Optional[float] = Field(None, gt=0, le=100, description="weights N(0, init_std^2), biases 0; default: torch's init")
    encoder: NetworkSpec = arch(NetworkSpec(), description="your own encoder: x (B, *sample shape) -> (B, out_features) = y logits, "
                                "then z (then z's log-variance)")
    decoder: NetworkSpec = arch(NetworkSpec(), description="your own decoder: (B, in_features) -> (B, *sample shape) logits or means")
    discriminator: NetworkSpec = arch(NetworkSpec(), description="your own discriminator (every D of the variant): (B, in_features) -> "
                                      "(B, 1) or (B,) logits")

    @field_validator("hidden", "disc_hidden", "encoder_hidden", "decoder_hidden")
    @classmethod
    def _widths(cls, v):
        return layer_sizes(v, MAX_WIDTH, "widths")

    @field_validator("conv_channels")
    @classmethod
    def _channels(cls, v):
        return layer_sizes(v, MAX_CHANNELS, "channels")

    @classmethod
    def architecture_keys(cls) -> tuple[str, ...]:
        return tuple(k for k, f in cls.model_fields.items() if (f.json_schema_extra or {}).get("architecture"))

    def architecture(self) -> dict:
        """The settings a checkpoint's weights depend on (the fields declared with `arch`)."""
        d = self.model_dump(mode="json")
        # a built-in network is left out, so checkpoints written before model.encoder/decoder/discriminator existed still resume
        # likewise one y head (checkpoints from before model.cluster_heads) and model.deskew off
        return {k: d[k] for k in self.architecture_keys()
                if not (k in NETWORK_KEYS and d[k]["class_path"] is None) and not (k == "cluster_heads" and d[k] == 1)
                and not (k == "deskew" and not d[k])}


PRIOR_KINDS: dict[str, tuple[str, ...]] = {  # kind -> its parameters; aae_dist.models.priors.prior registers more
    "gaussian": ("std",), "uniform": ("low", "high"), "gamma": ("shape", "scale"),
    "mixture": ("components", "radius", "radial_std", "tangential_std"), "swiss_roll": ("components", "radius"),
    "categorical": ("components",),
}


class PriorConfig(Section):
    """Every kind's parameters under one section (so every key works from YAML and --set); `params()` is the
    chosen kind's own, which the kind's class in models/priors.py checks and builds from."""

    kind: str = Field("gaussian", description="the prior p(z) codes are matched to: gaussian|uniform|gamma|mixture|swiss_roll|categorical, "
                                              "or one registered by a module in train.imports")
    std: float = Field(1.0, gt=0, le=1e6, description="gaussian")
    low: float = Field(-1.0, ge=-1e6, le=1e6, description="uniform")
    high: float = Field(1.0, ge=-1e6, le=1e6, description="uniform: upper bound")
    shape: float = Field(2.0, gt=0, le=1e6, description="gamma concentration")
    scale: float = Field(1.0, gt=0, le=1e6, description="gamma scale")
    components: int = Field(10, gt=0, le=MAX_CLASSES, description="mixture / swiss roll segments / categorical classes")
    radius: float = Field(4.0, gt=0, le=1e6, description="mixture: distance of component means from the origin")
    radial_std: float = Field(0.5, gt=0, le=1e6, description="mixture: spread of a component along its radius")
    tangential_std: float = Field(0.1, gt=0, le=1e6, description="mixture: spread of a component across its radius")
    options: dict[str, Annotated[float, Field(ge=-1e6, le=1e6)]] = Field({}, description="parameters of a prior registered by train.imports "
                                                                          "(the built-in kinds take theirs above)")

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, v):
        if v not in PRIOR_KINDS:
            raise ValueError(f"{v!r} is not a prior: use one of {', '.join(PRIOR_KINDS)}, or register yours "
                             "(aae_dist.models.priors.prior) in a module named by train.imports")
        return v

    def params(self) -> dict:
        """The chosen kind's parameters: its fields here, then prior.options."""
        names = PRIOR_KINDS[self.kind]
        return {**{n: getattr(self, n) for n in names if n in type(self).model_fields}, **self.options}


class PhaseConfig(Section):
    lr: float = Field(gt=0, le=MAX_SCALE, description="learning rate")
    optimizer: Literal["adam", "sgd"] = Field("adam", description="adam, or sgd with momentum (the paper's)")
    beta1: float = Field(0.5, ge=0, lt=1, description="adam")
    beta2: float = Field(0.999, ge=0, lt=1, description="adam")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd (paper: 0.9 reconstruction/supervised, 0.1 adversarial)")
    decay_epochs: list[Annotated[int, Field(ge=0, le=MAX_STEPS)]] = Field([], description="multiply lr by `decay` at each of these epochs (paper: /10 at epoch 50)")
    every: int = Field(1, gt=0, le=MAX_STEPS, description="run on steps where step % every == 0")
    weight: float = Field(1.0, ge=0, le=MAX_SCALE, description="loss weight")
    schedule: Literal["constant", "cosine", "step"] = Field("constant", description="learning-rate shape over the run")
    decay_every: int = Field(10_000, gt=0, le=MAX_STEPS, description="schedule=step")
    decay: float = Field(0.1, gt=0, le=1e6, description="schedule=step and decay_epochs")
    terms: dict[str, Annotated[float, Field(ge=0, le=MAX_SCALE)]] = Field({}, description="weights of loss terms registered for this "
                                                                          "phase under these names (train.imports; 0 or absent: off)")


class ReconstructionPhaseConfig(PhaseConfig):
    consistency: float = Field(0.0, ge=0, le=MAX_SCALE, description="variants with a categorical y: weight of KL(y(x) || y(x shifted)), "
                                                       "the y of a randomly translated image learns the y of the image (0: off)")
    consistency_shift: int = Field(2, ge=1, le=4096, description="largest translation in pixels, per sample and axis (consistency > 0)")
    consistency_rotate: float = Field(0.0, ge=0, le=90, description="largest rotation in degrees, per sample (consistency > 0)")
    consistency_scale: float = Field(0.0, ge=0, lt=1, description="largest zoom in or out as a fraction, per sample (consistency > 0)")
    consistency_shear: float = Field(0.0, ge=0, le=60, description="largest slant (shear) in degrees, per sample (consistency > 0)")
    consistency_thickness: float = Field(0.0, ge=0, le=1, description="largest change of stroke width, as a fraction of a 3x3 dilation "
                                                      "(thicker) or erosion (thinner), per sample (consistency > 0)")
    consistency_target: Literal["noisy", "clean"] = Field("noisy", description="what the consistency, vat and neighbours terms' target y(x) sees: "
                                                          "the reconstruction's own noisy input, or x without input noise or dropout")
    consistency_threshold: float = Field(0.0, ge=0, lt=1, description="consistency > 0: 0, every moved copy learns the whole target y (KL); "
                                                           "above 0, only copies whose target is at least this confident count, and "
                                                           "they learn its most likely class (FixMatch's pseudo-labels; 0.95 there)")
    vat: float = Field(0.0, ge=0, le=MAX_SCALE, description="variants with a categorical y: weight of KL(y(x) || y(x + r)), r the perturbation of "
                                               "L2 norm vat_eps that changes y most (virtual adversarial training; 0: off)")
    vat_eps: float = Field(2.0, gt=0, le=1e6, description="L2 norm of the adversarial perturbation, in pixel units of [0, 1] images (vat > 0)")
    vat_alpha: float = Field(0.0, ge=0, le=1e6, description="vat > 0: the radius of each sample's perturbation is vat_alpha x its distance "
                                                  "to its vat_neighbours-th nearest training sample (IMSAT: 0.25; batch-norm statistics "
                                                  "frozen in the VAT pass); 0: every sample gets vat_eps")
    vat_neighbours: int = Field(10, ge=1, le=1000, description="vat_alpha > 0: which nearest neighbour sets the radius (IMSAT: 10)")
    neighbours: float = Field(0.0, ge=0, le=MAX_SCALE, description="variants with a categorical y: weight of KL(y(x) || y(n)), n one of x's "
                                                      "neighbours_k nearest training samples drawn each step (SCAN's neighbour "
                                                      "consistency; searched once per dataset, in neighbours_space, stored "
                                                      "as neighbours.npz in the run folder; 0: off)")
    neighbours_k: int = Field(5, ge=1, le=1000, description="neighbours > 0: how many nearest training samples x's neighbour is drawn from")
    neighbours_space: Literal["input", "deskewed"] = Field("input", description="neighbours > 0: where the nearest samples are searched: "
                                                           "the model's input (deskewed already with model.deskew), or images "
                                                           "deskewed (slant and centre of mass normalised by their moments, as "
                                                           "for k-NN on handwriting)")
    neighbours_mutual: bool = Field(False, description="neighbours > 0: x's neighbour is drawn only among the nearest that would also "
                                                 "count x among their neighbours_k nearest (mutual nearest neighbours: fewer pairs "
                                                 "across classes); a sample with none draws its nearest")
    neighbours_moved: bool = Field(False, description="neighbours > 0: the neighbour is also moved as the consistency term's copies are "
                                                "(consistency_shift / rotate / scale / shear / thickness; images only)")
    info: float = Field(0.0, ge=0, le=MAX_SCALE, description="variants with a categorical y: weight of H(y|x) - info_mu x H(mean y), the "
                                                "marginal over the global batch (IMSAT's information term: confident, balanced clusters; 0: off)")
    info_mu: float = Field(4.0, ge=0, le=1e6, description="info > 0: weight of the marginal entropy against the conditional one (IMSAT: 4)")


class ClassificationPhaseConfig(PhaseConfig):
    shift: int = Field(0, ge=0, le=4096, description="largest translation in pixels of each labelled image, per axis (0: none)")
    rotate: float = Field(0.0, ge=0, le=90, description="largest rotation in degrees of each labelled image (0: none)")
    scale: float = Field(0.0, ge=0, lt=1, description="largest zoom in or out of each labelled image, as a fraction (0: none)")

    @property
    def moves(self) -> bool:
        return bool(self.shift or self.rotate or self.scale)


class DiscriminatorPhaseConfig(PhaseConfig):
    repeat: int = Field(1, gt=0, le=1000, description="D steps per generator step")
    input_noise: float = Field(0.0, ge=0, le=1e6, description="std of noise added to D's inputs")
    skip_above_accuracy: Optional[float] = Field(None, gt=0, le=1, description="skip D while its global accuracy is above")


class GeneratorPhaseConfig(PhaseConfig):
    categorical: float = Field(1.0, ge=0, le=MAX_SCALE, description="variants with a categorical y: weight of fooling the categorical D "
                                                       "(0: no categorical adversary, its phase is not run; y is then shaped by "
                                                       "reconstruction.info / vat / consistency alone, as IMSAT)")


class PhasesConfig(Section):
    reconstruction: ReconstructionPhaseConfig = Field(ReconstructionPhaseConfig(lr=1e-3, beta1=0.9),
                                                      description="encoder+decoder minimise the reconstruction error")
    discriminator: DiscriminatorPhaseConfig = Field(DiscriminatorPhaseConfig(lr=2e-4), description="D tells prior samples from codes")
    discriminator_cat: DiscriminatorPhaseConfig = Field(DiscriminatorPhaseConfig(lr=2e-4), description="D on the categorical y")
    generator: GeneratorPhaseConfig = Field(GeneratorPhaseConfig(lr=2e-4), description="the encoder learns to fool D")
    classification: ClassificationPhaseConfig = Field(ClassificationPhaseConfig(lr=1e-3, beta1=0.9),
                                                      description="semi-supervised: y on labelled samples")


class TrainConfig(Section):
    epochs: int = Field(10, gt=0, le=MAX_STEPS, description="passes over the training split")
    max_steps: Optional[int] = Field(None, gt=0, le=MAX_STEPS, description="stop early when set")
    checkpoint_every: int = Field(500, gt=0, le=MAX_STEPS, description="steps")
    keep_checkpoints: int = Field(3, gt=0, le=1_000_000, description="newest checkpoints kept in the run folder")
    max_failures: int = Field(3, ge=0, le=1_000_000, description="worker failures survived")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seeds weights, data order, labelled subset and every random draw")
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS, description="reconstruction-only steps first")
    sync_every: int = Field(20, gt=0, le=MAX_STEPS, description="steps between the coordinator's reductions")
    target_recon_loss: Optional[float] = Field(None, description="stop once the reduced reconstruction loss is below")
    amp: bool = Field(False, description="bf16 autocast, GPU only (kept as an alias of precision=bf16 on GPUs)")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16: the forwards under bf16 autocast on GPU, or on a CPU with native "
                                               "bf16 (avx512_bf16/AMX; refused elsewhere); weights, gradients, losses and reductions stay fp32")
    fused: bool = Field(True, description="fused Adam/SGD kernels (one per phase) where torch has them for the device; false: the "
                                          "per-parameter loop")
    share_codes: Literal["exact", "noisy", "off"] = Field(
        "exact", description="the discriminator phases and the generator share one encoder forward per step.  exact (or true): only "
                             "where a second forward gives the same values (a built-in encoder without noise, dropout, batch norm or "
                             "a sampled posterior): one forward fewer, the same training; noisy: any built-in encoder, one noise, "
                             "dropout and posterior draw and one batch-norm update per step where each phase drew its own (changes "
                             "the training: see RESULTS.md); off (or false): each phase runs its own.  Never with micro-batches or compile")
    compile: bool = Field(False, description="torch.compile the training step (train.compile_scope says which part; inductor: "
                                            "fewer, fused kernels; the optimizers and the coordinator's reductions stay eager).  For "
                                            "GPUs, whose step is bound by kernel launches; costs compile time at start; trains like eager "
                                            "(tested on CPU)")
    compile_scope: Literal["networks", "phases"] = Field("networks", description="with train.compile: networks: each network's forward; "
                                                         "phases: each phase's whole loss (every forward it makes and its terms, "
                                                         "one compiled region per phase, split only at its seeded random draws)")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = Field(
        "default", description="torch.compile's mode with train.compile: reduce-overhead replays the compiled regions' forward and "
                               "backward as CUDA graphs on GPUs (static shapes: batches are full, data.batch_size each); on a CPU "
                               "there are no CUDA graphs and it compiles as default")
    grad_compression: Union[Literal["none", "fp16", "bf16", "powersgd"], dict[str, Literal["none", "fp16", "bf16", "powersgd"]]] = Field(
        "none", description="how gradients travel: none, fp16/bf16 (half the bytes), powersgd (low-rank); one for all networks or "
                            "per network, e.g. {encoder: powersgd, decoder: powersgd, discriminator: fp16}")
    accumulate: int = Field(1, gt=0, le=65536, description="micro-batches (of data.batch_size each) per optimizer step per phase; gradients "
                                                    "are all-reduced once per step (DDP no_sync on the others): K x fewer bytes per sample")
    average_every: int = Field(1, gt=0, le=MAX_STEPS, description="1: gradients all-reduced every step (DDP); H > 1: local SGD, each worker "
                                                       "steps on its own gradients and the parameters are averaged every H steps "
                                                       "(and at checkpoints): H x fewer bytes per sample, as many updates as DDP")
    powersgd_rank: int = Field(2, gt=0, le=4096, description="rank of PowerSGD's gradient approximation (with error feedback)")
    threads: Optional[int] = Field(None, gt=0, le=4096, description="torch threads per worker")
    image_every: int = Field(500, gt=0, le=MAX_STEPS, description="steps between TensorBoard images and figures")
    nan_policy: Literal["skip", "stop"] = Field("stop", description="non-finite loss: stop (last checkpoint kept) or skip the update")
    progress: bool = Field(True, description="progress bar on rank 0")
    autoencoder_baseline: bool = Field(False, description="clustering: also train a plain autoencoder (same networks and steps, z as wide "
                                       "as y and z together) and score k-means on its codes in summary.json['baselines']")
    parzen_samples: int = Field(10_000, ge=0, le=MAX_SAMPLES, description="decoded prior samples for parzen_ll at the end (0: skip)")
    keep_best: Optional[str] = Field(None, description="also keep the checkpoint best by this metric reported at every checkpoint "
                                                        "(e.g. reconstruction/loss), besides the newest keep_checkpoints; Ray ranks "
                                                        "Result.best_checkpoints by it too")
    keep_best_mode: Literal["min", "max"] = Field("min", description="keep_best: whether the lowest or the highest value is best")
    callbacks: list[str] = Field([], description="trainer callbacks, 'module:function' each, called as fn(event, **info) on the "
                                                 "workers (events 'step', 'checkpoint_written'; see aae_dist/training/callbacks.py)")
    imports: list[str] = Field([], description="modules every worker imports before building: they may register loss terms "
                                               "(aae_dist.training.terms.term) and priors (aae_dist.models.priors.prior)")

    @field_validator("share_codes", mode="before")
    @classmethod
    def _share_codes_bool(cls, v):
        """true / false, as written before the noisy mode existed."""
        return {True: "exact", False: "off"}.get(v, v) if isinstance(v, bool) else v

    @model_validator(mode="after")
    def _one_way_to_save_bytes(self):
        if self.average_every > 1 and self.grad_compression != "none":
            raise ValueError(f"train.average_every={self.average_every} sends no gradients, so train.grad_compression has nothing to "
                             "compress: drop one of the two")
        for key, default in (("compile_scope", "networks"), ("compile_mode", "default")):
            if getattr(self, key) != default and not self.compile:
                raise ValueError(f"train.{key}={getattr(self, key)} applies only with train.compile=true: set it, or drop train.{key}")
        return self


class MlflowLogConfig(Section):
    tracking_uri: Optional[str] = Field(None, description="MLflow tracking URI (http://127.0.0.1:5000, sqlite:///mlflow.db); none with "
                                                          "experiment unset: MLflow off; none with experiment set: MLFLOW_TRACKING_URI")
    experiment: Optional[str] = Field(None, description="MLflow experiment the run is logged to; default: aae-dist")

    @property
    def enabled(self) -> bool:
        return self.tracking_uri is not None or self.experiment is not None


class WandbLogConfig(Section):
    project: Optional[str] = Field(None, description="W&B project; none: W&B off")
    mode: Literal["online", "offline", "disabled"] = Field("online", description="offline: files under RUN/wandb, `wandb sync` them later")

    @property
    def enabled(self) -> bool:
        return self.project is not None and self.mode != "disabled"


class LogConfig(Section):
    mlflow: MlflowLogConfig = Field(MlflowLogConfig(), description="experiment tracking in MLflow (rank 0): the TensorBoard scalars, "
                                                                   "hparams, final metrics, figures as artifacts")
    wandb: WandbLogConfig = Field(WandbLogConfig(), description="experiment tracking in Weights & Biases (rank 0), as for MLflow")


class RunSection(Section):
    name: str = Field("", description="empty: aae-YYYYmmdd-HHMMSS")
    storage: str = Field("runs", description="where run folders go (path or fsspec URL)")
    workers: str = Field("1", description="N, or MIN:MAX (elastic); 0 = in-process, no Ray; parsed once into `worker_range`")
    gpu: bool = Field(False, description="one GPU per worker (NCCL)")
    address: Optional[str] = Field(None, description="Ray cluster to join; default: a fresh local Ray")
    placement: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = Field("PACK", description="where Ray puts the workers")
    resources_per_worker: dict[str, Annotated[float, Field(ge=0, le=1e9)]] = Field({}, description="extra Ray resources each worker asks for (e.g. {'worker_node': 1})")
    shared_storage: bool = Field(False, description="a local --storage path that is a mount shared by every node")
    cpus_per_worker: Optional[int] = Field(None, gt=0, le=4096, description="default: local Ray shares this machine's cores; a cluster gives 1")
    autoscaling: bool = Field(False, description="the cluster adds nodes on demand: do not refuse workers it cannot place now")
    resize_check_s: float = Field(60.0, ge=0, le=1e6, description="elastic runs (--workers MIN:MAX): seconds between looks for room to grow; "
                                  "a resize restarts the group from the last checkpoint")
    _range: tuple[int, int] = PrivateAttr((1, 1))

    @field_validator("workers", mode="before")
    @classmethod
    def _workers_text(cls, v):
        return str(v) if isinstance(v, int) else v

    @model_validator(mode="after")
    def _parse_workers(self):
        lo, sep, hi = self.workers.partition(":")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"--workers {self.workers!r}: expected N or MIN:MAX, e.g. --workers 2") from None
        if a < 0 or b < a or (sep and a == 0):
            raise ValueError(f"--workers {self.workers!r}: need 0 <= MIN <= MAX (0 = in-process)")
        if b > MAX_WORKERS:
            raise ValueError(f"--workers {self.workers!r}: at most {MAX_WORKERS} workers")
        self._range = (a, b)
        return self

    @property
    def worker_range(self) -> tuple[int, int]:
        """(min, max) workers; max 0 = in-process without Ray."""
        return self._range

    @property
    def uses_ray(self) -> bool:
        return self._range[1] > 0


class Config(Section):
    data: DataConfig = Field(DataConfig(), description="the dataset and how it is read")
    model: ModelConfig = Field(ModelConfig(), description="the networks and the variant")
    prior: PriorConfig = Field(PriorConfig(), description="the prior p(z)")
    phases: PhasesConfig = Field(PhasesConfig(), description="optimizer and schedule per phase")
    train: TrainConfig = Field(TrainConfig(), description="length, checkpoints, numerics, evaluation")
    run: RunSection = Field(RunSection(), description="run name, storage, workers, cluster")
    log: LogConfig = Field(LogConfig(), description="experiment trackers beside TensorBoard: MLflow, W&B")
    _given: frozenset = PrivateAttr(frozenset())  # dotted keys a base, YAML file or --set gave (load_config fills it)

    @model_validator(mode="before")
    @classmethod
    def _import_plugins(cls, doc):
        """train.imports first: the loss terms and prior kinds they register are then known to the checks."""
        import importlib

        names = ((doc or {}).get("train") or {}).get("imports") or [] if isinstance(doc, dict) else []
        for name in names if isinstance(names, list) else []:
            try:
                importlib.import_module(str(name))
            except ImportError as e:
                raise ValueError(f"train.imports: module {name!r} cannot be imported ({e}): make it importable where aae-dist "
                                 "and its workers run (PYTHONPATH, submit --py-modules)") from None
        return doc

    def given(self, key: str) -> bool:
        """Whether the user set `key` (or a section holding it): a default that depends on the dataset (e.g. a
        table's smaller networks) is applied only where this is false."""
        return any(g == key or g.startswith(key + ".") or key.startswith(g + ".") for g in self._given)

    def to_dict(self, redact: bool = False) -> dict:
        """Plain data; redact=True drops credentials from URLs before the config is saved or logged."""
        d = self.model_dump(mode="json")
        if redact:
            from .storage import redact as clean

            for section, key in (("data", "path"), ("data", "cache_dir"), ("run", "storage"), ("run", "address")):
                if d[section][key]:
                    d[section][key] = clean(d[section][key])
            if d["log"]["mlflow"]["tracking_uri"]:
                d["log"]["mlflow"]["tracking_uri"] = clean(d["log"]["mlflow"]["tracking_uri"])
        return d


def _explain(exc: ValidationError, origin: str) -> UserError:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        hint = _did_you_mean(err["loc"]) or " check the spelling"
        return UserError(f"unknown config key '{key}' in {origin}:{hint} (aae-dist config lists every key)")
    value = err.get("input")
    if err["type"] == "value_error" and isinstance(value, dict):  # a check across a section's keys
        return UserError(f"{err['msg'].removeprefix('Value error, ')} (in {origin})")
    return UserError(f"bad value for config key '{key}' in {origin}: {_message(err)} (got {_short(value)})")


def _did_you_mean(loc: tuple) -> str:
    """' did you mean 'train.epochs'?' for a misspelt key: the closest key of the same section (difflib)."""
    import difflib

    section: type[BaseModel] = Config
    for part in loc[:-1]:
        ann = section.model_fields.get(str(part))
        ann = ann.annotation if ann else None
        if not (isinstance(ann, type) and issubclass(ann, Section)):
            return ""
        section = ann
    close = difflib.get_close_matches(str(loc[-1]), list(section.model_fields), n=1, cutoff=0.6)
    return f" did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?" if close else ""


_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _message(err: dict) -> str:
    """pydantic's message, with a bound written as a number (1e+30, not thirty-one digits)."""
    if err["type"] in _BOUNDS and err.get("ctx"):
        bound = next(iter(err["ctx"].values()))
        return f"must be {_BOUNDS[err['type']]} {bound:g}" if isinstance(bound, float) else f"must be {_BOUNDS[err['type']]} {bound}"
    return err["msg"].removeprefix("Value error, ")


def _short(value) -> str:
    """The offending value as typed, cut short: a pasted list of a million widths is not an error line."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _set_path(doc: dict, dotted: str, value, origin: str) -> None:
    parts = dotted.split(".")
    node = doc
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise UserError(f"config key '{dotted}' in {origin}: '{p}' is a value, not a section")
    node[parts[-1]] = value


def set_value(section: Section, key: str, value, origin: str) -> None:
    """Assign one checked value (e.g. from a command-line flag); a bad one is a UserError."""
    try:
        setattr(section, key, value)
    except ValidationError as exc:
        raise _explain(exc, origin) from None


def load_config(path: str | None = None, overrides: list[str] = (), base: dict | None = None) -> Config:
    """Defaults <- YAML file <- `--set KEY=VALUE` (values parsed as YAML scalars)."""
    doc: dict = _merge(Config().to_dict(), base or {})  # sections keep their defaults when one key is set
    from_file = read_config_file(path) if path else {}
    doc = _merge(doc, from_file)
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.epochs=5")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_path(doc, key.strip(), value, f"--set {item}")
    try:
        cfg = Config.model_validate(doc)
    except ValidationError as exc:
        raise _explain(exc, path or "--set") from None
    cfg._given = frozenset(_dotted(base or {}) | _dotted(from_file) | {item.partition("=")[0].strip() for item in overrides})
    return cfg


def _dotted(doc: dict, prefix: str = "") -> set[str]:
    """The dotted keys of a nested mapping's leaves (a value that is a mapping is descended into)."""
    out = set()
    for k, v in doc.items():
        out |= _dotted(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}"}
    return out


def read_config_file(path: str) -> dict:
    """A YAML config file's mapping; any file that is not one (a folder, not UTF-8, a list) is a UserError."""
    try:
        with open(path, encoding="utf-8") as fh:
            loaded = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise UserError(f"config file {path} not found") from None
    except IsADirectoryError:
        raise UserError(f"--config {path} is a directory: pass a YAML file, e.g. jobs/cpu/mnist_aae.yaml") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"config file {path} is not UTF-8 text (byte {exc.start}): save it as UTF-8") from None
    except OSError as exc:
        raise UserError(f"config file {path} cannot be read ({exc.strerror or type(exc).__name__}): check the path and its permissions") from None
    except yaml.YAMLError as exc:
        raise UserError(f"config file {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(loaded, dict):
        raise UserError(f"config file {path} must hold a mapping of sections, got {type(loaded).__name__}")
    return loaded


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def describe(model: type[Section] = Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, meaning) of every config key, read from the model itself (so it cannot drift)."""
    rows = []
    for name, f in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, Section):
            rows.append((key, "section", "", f.description or ""))
            rows += describe(ann, key + ".")
            continue
        default = f.default
        rows.append((key, _type_name(ann), "(required)" if f.is_required() else repr(default), (f.description or "") + _range(f)))
    return rows


def _range(f) -> str:
    """The bounds load_config enforces, for `aae-dist config` (e.g. " [> 0, <= 1e+30]")."""
    ops = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    parts = [f"{sym} {getattr(m, op):g}" if isinstance(getattr(m, op), float) else f"{sym} {getattr(m, op)}"
             for m in f.metadata for op, sym in ops.items() if getattr(m, op, None) is not None]
    return f" [{', '.join(parts)}]" if parts else ""


def _type_name(ann) -> str:
    import typing

    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin is typing.Union:
        return " or ".join("none" if a is type(None) else _type_name(a) for a in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(ann, "__name__", str(ann))
