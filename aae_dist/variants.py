"""The paper's AAE variants as data: one row per variant, read by networks, sampling, pre-flight
checks, the phase list and evaluation.  Adding a variant is one row here (plus at most one loss).

This is the only module (with the config's validation) that knows variants by name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DecoderInput = Literal["z", "z+label", "z+y", "heads"]


@dataclass(frozen=True)
class Variant:
    name: str
    section: str  # where the paper describes it
    labels: Literal["none", "required", "optional"]  # does training read the dataset's labels
    decoder_input: DecoderInput  # z alone; z with the true one-hot label; z with the encoder's softmax y; y @ heads + z
    categorical: bool = False  # the encoder has a softmax y head matched to a categorical prior by its own D
    label_tag: bool = False  # D sees z together with the one-hot label (+ an 'unlabelled' class); the prior is conditioned on it
    classification: Literal["never", "always", "with_labeled_subset"] = "never"  # the supervised phase on labelled minibatches
    metrics: tuple[str, ...] = ()  # variant-specific metrics beyond recon/Parzen/prior match
    paper: tuple[tuple[str, str], ...] = ()  # (metric, what the paper reports on full MNIST), shown beside a run's figures

    @property
    def needs_classes(self) -> bool:
        """A number of classes K must be known (from the data or model.num_classes); samples then carry a class."""
        return self.categorical or self.label_tag or self.decoder_input == "z+label"

    @property
    def needs_labels(self) -> bool:
        return self.labels == "required"

    def uses_labels(self, labeled_per_class: int | None) -> bool:
        return self.labels == "required" or (self.labels == "optional" and bool(labeled_per_class))

    def has_classification_phase(self, labeled_per_class: int | None) -> bool:
        return self.classification == "always" or (self.classification == "with_labeled_subset" and bool(labeled_per_class))


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("basic", "Sec. 2-3", labels="none", decoder_input="z", paper=(("parzen_ll", "340 +- 2 nats"),)),
        Variant("label_regularized", "Sec. 2.3", labels="required", decoder_input="z", label_tag=True),
        Variant("supervised", "Sec. 4", labels="required", decoder_input="z+label"),
        Variant("semi_supervised", "Sec. 5", labels="required", decoder_input="z+y", categorical=True, classification="always",
                metrics=("classify_error",), paper=(("classify_error", "1.90% (100 labels)"),)),
        Variant("clustering", "Sec. 6", labels="none", decoder_input="z+y", categorical=True, metrics=("cluster_error",),
                paper=(("cluster_error", "9.55% (16 clusters), 4.10% (30)"),)),
        Variant("dim_reduction", "Sec. 7", labels="optional", decoder_input="heads", categorical=True,
                classification="with_labeled_subset", metrics=("cluster_error",)),
    )
}

NAMES = tuple(VARIANTS)


def variant(name: str) -> Variant:
    return VARIANTS[name]


@dataclass(frozen=True)
class Regularizer:
    """How codes are pushed towards the prior (model.regularizer): the phases (and so discriminators) it
    adds after reconstruction, the reconstruction terms it adds, and the posterior it needs."""

    name: str
    phases: tuple[str, ...]  # in step order; discriminator_cat only where the variant is categorical
    terms: tuple[str, ...] = ()  # reconstruction terms switched on by this row
    posterior: str | None = None  # the model.posterior it needs, if any


REGULARIZERS: dict[str, Regularizer] = {
    r.name: r
    for r in (
        Regularizer("adversarial", phases=("discriminator_cat", "discriminator", "generator")),
        Regularizer("kl", phases=(), terms=("kl",), posterior="gaussian"),  # the VAE baseline: negative ELBO, no D
    )
}


def regularizer(name: str) -> Regularizer:
    return REGULARIZERS[name]


def discriminators(row: Variant, reg: Regularizer) -> tuple[str, ...]:
    """The discriminator networks a (variant, regularizer) trains: one per adversarial phase it has."""
    return tuple(p for p in reg.phases if p.startswith("discriminator") and (p != "discriminator_cat" or row.categorical))
