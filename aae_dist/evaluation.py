"""The paper's metrics: held-out reconstruction, Parzen-window log-likelihood, classification and
clustering error, and a prior-match statistic (MMD).  Each rank evaluates its share of a split;
sums are all-reduced, so the figures are the same on every rank."""

from __future__ import annotations

import io
import math

import numpy as np
import torch

from . import seeds, storage
from .config import Config
from .data import ShardStream
from .distributed import all_gather
from .distributed import all_reduce_ as _allreduce
from .models import AAE
from .scoring import cluster_scores, kmeans_baseline, logistic_baseline

AUTOENCODER_FILE = "baseline_autoencoder.pt"  # the plain autoencoder of train.autoencoder_baseline, in the run folder

PARZEN_SIGMAS = np.logspace(-1, 0, 10)  # the standard protocol's grid (goodfeli/adversarial parzen_ll.py)
PARZEN_VALIDATION = 1000  # images sigma is chosen on


class Evaluator:
    def __init__(self, cfg: Config, aae: AAE, manifest, rank: int = 0, world: int = 1, data_path: str | None = None):
        self.cfg, self.aae, self.nets, self.prior, self.k = cfg, aae, aae.nets, aae.prior, aae.num_classes
        self.manifest, self.device, self.rank, self.world = manifest, aae.device, rank, world
        self.path = data_path or cfg.data.path
        self.generator = torch.Generator(device=self.device)
        self.num_heads = getattr(self.nets["encoder"], "num_heads", 1)  # model.cluster_heads of a categorical y
        self.head = 0  # the y head the metrics report (the chosen one, with several)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        return self.aae.normalise(x)

    def stream(self, split: str, world: int | None = None, rank: int | None = None) -> ShardStream:
        world = self.world if world is None else world
        rank = self.rank if rank is None else rank
        return ShardStream(self.path, split, 500, rank=rank, world_size=world, shuffle=False, manifest=self.manifest)

    def run(self, split: str) -> dict:
        with self.aae.evaluating():
            return self._run(split)

    def _run(self, split: str) -> dict:
        self.generator.manual_seed(seeds.evaluation(self.cfg.train.seed))
        enc, dec = self.nets["encoder"], self.nets["decoder"]
        out = self.choose_head() if self.num_heads > 1 else {}
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # recon*n, n, wrong, labelled
        wrong = torch.zeros(self.num_heads, dtype=torch.float64, device=self.device)  # per head
        codes = []
        for x, y in self.stream(split).iter_epoch(0):
            x, y = self.to_device(x), y.to(self.device)
            c = enc(x, generator=self.generator)
            z = c.mu if c.mu is not None else c.z
            sums[0] += self.aae.reconstruction_error(dec(z, self.aae.decoder_y(c, y)), x).double() * len(x)
            sums[1] += len(x)
            if c.y_logits is not None and (y >= 0).any():
                known = y >= 0
                sums[2] += (c.heads[self.head].argmax(1)[known] != y[known]).sum()
                sums[3] += known.sum()
                if self.num_heads > 1:
                    wrong += torch.stack([(h.argmax(1)[known] != y[known]).sum() for h in c.heads]).double()
            if sum(len(a) for a in codes) < 2000:
                codes.append(c.z.float())
        _allreduce(sums)
        out["recon_loss"] = float(sums[0] / sums[1])
        wanted = self.aae.variant.metrics
        if "classify_error" in wanted and sums[3] > 0:
            out["classify_error"] = float(sums[2] / sums[3])
            if self.num_heads > 1:
                out["classify_error_heads"] = (_allreduce(wrong) / sums[3]).tolist()
        if "cluster_error" in wanted and self.manifest.labels:
            out.update(self.cluster_metrics(split))
        out["prior_match"] = self.prior_match(torch.cat(codes)[:2000])  # every regularizer's codes aim at the prior
        if self.cfg.train.parzen_samples:
            out.update(self.parzen(split))
        if self.aae.rows is not None and self.rank == 0:
            out.update(self.table_report(split))
        return out

    def table_report(self, split: str) -> dict:
        """A table run's row report (quality, efficacy, privacy: tabular.py) in full under 'table' and as flat
        table/... numbers; rank 0 alone (it gathers nothing), on rows generated with the run's seed."""
        from .tabular import report_of, report_scalars

        report = report_of(self.aae, self.path, split, seed=self.cfg.train.seed)
        return {**report_scalars(report), "table": report}

    # ---- clustering ------------------------------------------------------------------------
    def choose_head(self) -> dict:
        """model.cluster_heads: the head the metrics report is the one with the lowest unsupervised objective
        H(y|x) - info_mu x H(mean y) on the training split in eval mode (IIC keeps its best head the same way);
        the stream's labels are never read, so no label can choose it."""
        mu = self.cfg.phases.reconstruction.info_mu
        acc = torch.zeros(self.num_heads, self.k + 2, dtype=torch.float64, device=self.device)  # sum p, sum H(y|x), n
        for x, _ in self.stream("train").iter_epoch(0):
            for i, h in enumerate(self.aae.encode(self.to_device(x), self.generator).heads):
                logp = torch.log_softmax(h.double(), 1)
                acc[i, : self.k] += logp.exp().sum(0)
                acc[i, self.k] += -(logp.exp() * logp).sum()
                acc[i, self.k + 1] += len(logp)
        _allreduce(acc)
        n = acc[:, self.k + 1 :].clamp_min(1)
        marginal = (acc[:, : self.k] / n).clamp_min(1e-300)
        objective = acc[:, self.k] / n[:, 0] + mu * (marginal * marginal.log()).sum(1)
        self.head = int(torch.argmin(objective))
        return {"cluster_head": self.head, "cluster_head_objectives": objective.tolist()}

    def assignments(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(cluster, confidence log q(y|x), label) of every sample of a split, gathered from all ranks; cluster and
        confidence have one row per y head."""
        parts = []
        for x, y in self.stream(split).iter_epoch(0):
            # log q(y|x) in float64: softmax saturates at 1.0 for sharp codes, which would tie the most confident samples
            best = [torch.log_softmax(h.double(), 1).max(1) for h in self.aae.encode(self.to_device(x), self.generator).heads]
            parts.append((torch.stack([b[1] for b in best]).cpu().numpy(), torch.stack([b[0] for b in best]).cpu().numpy(), y.numpy()))
        empty = (np.empty((self.num_heads, 0), np.int64), np.empty((self.num_heads, 0)), np.empty(0, np.int64))  # a rank with no share
        mine = tuple(np.concatenate([p[i] for p in parts], -1) if parts else empty[i] for i in range(3))
        everyone = all_gather(mine)
        return tuple(np.concatenate([e[i] for e in everyone], -1) for i in range(3))

    def cluster_metrics(self, split: str) -> dict:
        """The paper's clustering error (clusters labelled by their most confident training sample), the
        majority-vote error, and cluster usage, of the reported head; with several heads, every head's errors
        too.  Training labels are read here only to score."""
        pool = self.assignments("train")
        test = self.assignments(split)
        scores = [cluster_scores(pool[0][h], pool[1][h], pool[2].astype(np.int64), test[0][h], test[2].astype(np.int64), self.k)
                  for h in range(len(pool[0]))]
        out = dict(scores[self.head])
        if len(scores) > 1:
            out["cluster_error_heads"] = [s["cluster_error"] for s in scores]
            out["cluster_error_majority_heads"] = [s["cluster_error_majority"] for s in scores]
        return out

    # ---- baselines ---------------------------------------------------------------------------
    def pixels(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = zip(*((self.to_device(x).flatten(1).cpu().numpy(), y.numpy()) for x, y in self.stream(split, 1, 0).iter_epoch(0)))
        return np.concatenate(xs), np.concatenate(ys)

    def labelled(self) -> tuple[np.ndarray, np.ndarray]:
        """The labelled training samples the run learnt from: data.labeled_per_class of them (the same
        seeded choice as training makes), or the whole training split."""
        d = self.cfg.data
        if not d.labeled_per_class:
            return self.pixels("train")
        x, y = ShardStream(self.path, "train", 1, seed=self.cfg.train.seed, labeled_per_class=d.labeled_per_class,
                           manifest=self.manifest).labelled_samples()
        return self.to_device(torch.from_numpy(np.array(x))).flatten(1).cpu().numpy(), y

    def baselines(self, split: str, run_url: str | None = None, steps: int = 0) -> dict:
        """The floors the variant's metrics stand beside, on the same data: k-means on raw pixels with the
        same number of clusters, and logistic regression on exactly the run's labelled samples; with
        train.autoencoder_baseline (or a stored plain autoencoder in run_url), k-means on its codes."""
        wanted = self.aae.variant.metrics
        out: dict = {}
        if not self.manifest.labels or not wanted:
            return out
        x_test, y_test = self.pixels(split)
        if "cluster_error" in wanted:
            x_pool, y_pool = self.pixels("train")
            out.update(kmeans_baseline(x_pool, y_pool, x_test, y_test, self.k, seed=self.cfg.train.seed))
            out.update(self.autoencoder_kmeans(split, run_url, steps))
        if "classify_error" in wanted:
            out.update(logistic_baseline(*self.labelled(), x_test, y_test))
        return out

    def autoencoder_kmeans(self, split: str, run_url: str | None, steps: int) -> dict:
        """k-means on the codes of a plain autoencoder (the fair floor for clustering): the one stored in
        run_url, else, with train.autoencoder_baseline and `steps`, one trained now and stored there."""
        url = storage.join(run_url, AUTOENCODER_FILE) if run_url else None
        if url and storage.exists(url):
            ae = load_plain_autoencoder(self.cfg, self.aae, url)
        elif self.cfg.train.autoencoder_baseline and steps:
            ae = train_plain_autoencoder(self.cfg, self.aae, self.manifest, self.path, steps)
            if url:
                buf = io.BytesIO()
                torch.save({n: m.state_dict() for n, m in ae.nets.items()}, buf)
                storage.write_bytes_atomic(url, buf.getvalue())
        else:
            return {}
        with ae.evaluating():
            (x_pool, y_pool), (x_test, y_test) = (self.codes_of(ae, s) for s in ("train", split))
        return {f"autoencoder_{k}": v for k, v in kmeans_baseline(x_pool, y_pool, x_test, y_test, self.k, seed=self.cfg.train.seed).items()}

    def codes_of(self, ae: AAE, split: str) -> tuple[np.ndarray, np.ndarray]:
        zs, ys = zip(*((ae.encode(self.to_device(x)).z.float().cpu().numpy(), y.numpy()) for x, y in self.stream(split, 1, 0).iter_epoch(0)))
        return np.concatenate(zs), np.concatenate(ys)

    # ---- prior match -------------------------------------------------------------------------
    def prior_match(self, codes: torch.Tensor) -> float:
        """Unbiased MMD^2 between held-out codes and prior samples, RBF kernels at several scales."""
        n = len(codes)
        real = self.prior.sample(n, self.generator, self.device).float()  # label-regularised: the whole mixture
        value = mmd2(codes, real)
        t = _allreduce(torch.tensor([value, 1.0], dtype=torch.float64, device=self.device))
        return float(t[0] / t[1])

    # ---- Parzen window -----------------------------------------------------------------------
    def parzen(self, split: str, sample=None) -> dict:
        """Log-likelihood (nats) of the split under a Gaussian Parzen window on `train.parzen_samples`
        decoded prior samples (or `sample(n, generator)` pixels); sigma from the standard grid maximises
        the likelihood of 1,000 validation images: the 'validation' split where the dataset has one
        (never trained on), else the first training images (said in `parzen_sigma_split`)."""
        g = torch.Generator(device=self.device).manual_seed(seeds.parzen(self.cfg.train.seed))  # same samples on every rank
        sample = sample or self.aae.sample
        means = []
        remaining = self.cfg.train.parzen_samples
        while remaining > 0:
            n = min(2000, remaining)
            means.append(sample(n, g).flatten(1).double())
            remaining -= n
        mu = torch.cat(means)
        sigma_split = "validation" if "validation" in self.manifest.splits else "train"
        chosen = torch.zeros(1, dtype=torch.float64, device=self.device)
        if self.rank == 0:  # the search on one rank (every rank has the same samples), its answer shared
            val = torch.cat([self.to_device(x).flatten(1).double()
                             for x, _ in self.stream(sigma_split, world=1, rank=0).iter_epoch(0)])[:PARZEN_VALIDATION]
            chosen += best_sigma(val, mu, PARZEN_SIGMAS)
        _allreduce(chosen)
        best = float(chosen)
        acc = torch.zeros(3, dtype=torch.float64, device=self.device)
        for x, _ in self.stream(split).iter_epoch(0):
            ll = parzen_ll(self.to_device(x).flatten(1).double(), mu, best)
            acc += torch.stack([ll.sum(), (ll**2).sum(), torch.tensor(float(len(ll)), dtype=torch.float64, device=self.device)])
        _allreduce(acc)
        mean = acc[0] / acc[2]
        var = acc[1] / acc[2] - mean**2
        return {"parzen_ll": float(mean), "parzen_ll_se": float(torch.sqrt(var.clamp_min(0) / acc[2])), "parzen_sigma": float(best),
                "parzen_samples": len(mu), "parzen_sigma_split": sigma_split,
                "parzen_sigma_at_grid_edge": bool(best in (PARZEN_SIGMAS[0], PARZEN_SIGMAS[-1]))}


def best_sigma(val: torch.Tensor, mu: torch.Tensor, sigmas, chunk: int = 500) -> float:
    """The sigma of the grid under which `val` is most likely: squared distances computed once, then
    one cheap log-sum-exp per sigma (not one distance matrix per sigma)."""
    d = val.shape[1]
    mu_sq = (mu**2).sum(1)
    totals = torch.zeros(len(sigmas), dtype=torch.float64, device=val.device)
    for i in range(0, len(val), chunk):
        xb = val[i : i + chunk]
        sq = ((xb**2).sum(1, keepdim=True) + mu_sq[None] - 2 * xb @ mu.T).clamp_min(0)
        for j, sigma in enumerate(sigmas):
            totals[j] += torch.logsumexp(-sq / (2 * sigma**2), 1).sum() - len(xb) * 0.5 * d * math.log(2 * math.pi * sigma**2)
    return float(sigmas[int(totals.argmax())])


def parzen_ll(x: torch.Tensor, mu: torch.Tensor, sigma: float, chunk: int = 500) -> torch.Tensor:
    d = x.shape[1]
    const = -math.log(len(mu)) - 0.5 * d * math.log(2 * math.pi * sigma**2)
    mu_sq = (mu**2).sum(1)
    out = []
    for i in range(0, len(x), chunk):
        xb = x[i : i + chunk]
        sq = (xb**2).sum(1, keepdim=True) + mu_sq[None] - 2 * xb @ mu.T
        out.append(torch.logsumexp(-sq.clamp_min(0) / (2 * sigma**2), 1) + const)
    return torch.cat(out)


def mmd2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    n, m = len(a), len(b)
    if n < 2 or m < 2:
        return float("nan")
    xx, yy, xy = torch.cdist(a, a) ** 2, torch.cdist(b, b) ** 2, torch.cdist(a, b) ** 2
    scale = torch.median(xy).clamp_min(1e-9)
    total = 0.0
    for f in (0.25, 1.0, 4.0):
        h = scale * f
        kxx, kyy, kxy = torch.exp(-xx / h), torch.exp(-yy / h), torch.exp(-xy / h)
        total += float((kxx.sum() - n) / (n * (n - 1)) + (kyy.sum() - m) / (m * (m - 1)) - 2 * kxy.mean())
    return total


# ---- the plain autoencoder baseline ------------------------------------------------------------

def plain_autoencoder_config(cfg: Config, k: int) -> Config:
    """The run's networks as a plain autoencoder: its z as wide as the run's y and z together, the same
    input noise and dropout, reconstruction only (no adversary, no y terms)."""
    c = Config.model_validate(cfg.to_dict())
    c.model.variant, c.model.latent_dim, c.model.num_classes, c.model.cluster_heads = "basic", cfg.model.latent_dim + k, None, 1
    return c


def train_plain_autoencoder(cfg: Config, aae: AAE, manifest, path: str, steps: int) -> AAE:
    """Reconstruction alone with the reconstruction phase's Adam, learning rate steps and batch, for `steps`
    steps over the training split (one process: it runs on rank 0 after the run)."""
    c = plain_autoencoder_config(cfg, aae.num_classes)
    torch.manual_seed(seeds.evaluation(cfg.train.seed))
    ae = AAE(c.model, c.prior, aae.shape, manifest.dtype, 0).to(aae.device)
    params = [p for n in ("encoder", "decoder") for p in ae.nets[n].parameters()]
    rc = cfg.phases.reconstruction
    opt = torch.optim.Adam(params, lr=rc.lr, betas=(rc.beta1, rc.beta2))
    data = ShardStream(path, "train", cfg.data.batch_size, seed=cfg.train.seed, drop_last=True, manifest=manifest)
    edges = [e * len(data) for e in rc.decay_epochs]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: rc.decay ** sum(s >= e for e in edges))
    g = torch.Generator(device=aae.device).manual_seed(seeds.evaluation(cfg.train.seed))
    step, epoch = 0, 0
    for n in ("encoder", "decoder"):
        ae.nets[n].train()
    while step < steps:
        for x, _ in data.iter_epoch(epoch):
            x = ae.normalise(x)
            loss = ae.reconstruction_error(ae.nets["decoder"](ae.nets["encoder"](x, generator=g).z), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step >= steps:
                break
        epoch += 1
    return ae.eval()


def load_plain_autoencoder(cfg: Config, aae: AAE, url: str) -> AAE:
    c = plain_autoencoder_config(cfg, aae.num_classes)
    ae = AAE(c.model, c.prior, aae.shape, aae.dtype, 0)
    state = torch.load(io.BytesIO(storage.read_bytes(url)), map_location="cpu", weights_only=True)
    for n in ("encoder", "decoder"):
        ae.nets[n].load_state_dict(state[n])
    return ae.to(aae.device).eval()
