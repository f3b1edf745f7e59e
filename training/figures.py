"""The paper's visual analysis of the disentangled latent space (Hamaguchi et al., CVPR 2019).

- Figure 4 (:func:`interpolation_figure`): for pairs of images (A, B), decode while moving the
  common features z_c from A to B with the specific features fixed at A's, and the other way round.
  When the disentanglement works, the "common" row changes the digit and keeps the rotation /
  background, and the "specific" row keeps the digit and changes the rotation / background / style.
- Figure 5 (:func:`embedding_figure`): 2-D embeddings (PCA, or t-SNE when scikit-learn is
  installed) of mu_c and of mu_s, coloured by digit class: mu_c should cluster by digit, mu_s not.
- A number to go with the pictures (:func:`separability`): how well the digit class can be read
  from mu_c and from mu_s (nearest class centroid and a linear probe, fitted on one set of images
  and scored on another). Chance is 10 %; mu_c should be far above mu_s.

:func:`make_figures` does all three for a pre-training checkpoint (``pretrain_last.pt``) on the
Augmented MNIST test pairs::

    python -m training.figures runs/table3/<digest>/MNIST-R/s0/with_sim/pretrain_last.pt \
        --variant MNIST-R --out figs/
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from training.datasets.augmented_mnist import make_pairs
from training.model import DisentangledVAE, ModelConfig, Posterior

log = logging.getLogger(__name__)

BATCH = 1024
EMBEDDING_METHODS = ("pca", "lda", "tsne")


# ------------------------------------------------------------------------------ encode / decode


def _unit(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float in [0, 1]; float input is taken as already in [0, 1]."""
    x = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    if x.ndim == 3:  # (N, H, W): one channel
        x = x[:, None]
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


@torch.no_grad()
def encode(vae: DisentangledVAE, images: np.ndarray | torch.Tensor) -> Posterior:
    """The posterior of each image, in eval mode and batches; (N, z_*) tensors."""
    was_training = vae.training
    vae.eval()
    try:
        x = _unit(images)
        parts = [vae.encoder(x[i : i + BATCH]) for i in range(0, len(x), BATCH)]
    finally:
        vae.train(was_training)
    return Posterior(
        *(
            torch.cat([getattr(p, k) for p in parts])
            for k in ("mu_c", "logvar_c", "mu_s", "logvar_s")
        )
    )


@torch.no_grad()
def decode(vae: DisentangledVAE, z_c: torch.Tensor, z_s: torch.Tensor) -> np.ndarray:
    """Images in [0, 1], (N, C, H, W): sigmoid of the decoder output for both likelihoods."""
    was_training = vae.training
    vae.eval()
    try:
        out = [
            torch.sigmoid(vae.decoder(z_c[i : i + BATCH], z_s[i : i + BATCH]))
            for i in range(0, len(z_c), BATCH)
        ]
    finally:
        vae.train(was_training)
    return torch.cat(out).numpy()


# -------------------------------------------------------------------------- Figure 4: interpolation


def interpolate(
    vae: DisentangledVAE, images_a: np.ndarray, images_b: np.ndarray, steps: int = 8
) -> dict[str, np.ndarray]:
    """Decoded interpolations from A to B, each (N, steps, C, H, W) in [0, 1]:

    ``common``: z_c = (1 - t) mu_c(A) + t mu_c(B), z_s = mu_s(A);
    ``specific``: z_c = mu_c(A), z_s = (1 - t) mu_s(A) + t mu_s(B); t = 0 .. 1 in ``steps``.
    Column 0 of both is the reconstruction decode(mu_c(A), mu_s(A))."""
    if steps < 2:
        raise ValueError(f"steps must be >= 2, not {steps}")
    if len(images_a) != len(images_b):
        raise ValueError(f"{len(images_a)} images A but {len(images_b)} images B")
    qa, qb = encode(vae, images_a), encode(vae, images_b)
    n = len(qa.mu_c)
    t = torch.linspace(0.0, 1.0, steps)[None, :, None]  # (1, steps, 1)

    def lerp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # (N, D) -> (N * steps, D)
        return (a[:, None] + t * (b - a)[:, None]).reshape(n * steps, -1)

    def hold(a: torch.Tensor) -> torch.Tensor:  # (N, D) -> (N * steps, D)
        return a.repeat_interleave(steps, dim=0)

    common = decode(vae, lerp(qa.mu_c, qb.mu_c), hold(qa.mu_s))
    specific = decode(vae, hold(qa.mu_c), lerp(qa.mu_s, qb.mu_s))
    shape = (n, steps, *common.shape[1:])
    return {"common": common.reshape(shape), "specific": specific.reshape(shape)}


def _show(ax: plt.Axes, image: np.ndarray) -> None:
    """One (C, H, W) image in [0, 1] without ticks."""
    if image.shape[0] == 1:
        ax.imshow(image[0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(np.clip(image.transpose(1, 2, 0), 0.0, 1.0), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _save(fig: plt.Figure, path: Path, dpi: int) -> Path:
    """Write to a temporary name beside ``path``, then rename: never half a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=dpi, facecolor="white")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def interpolation_figure(
    vae: DisentangledVAE,
    images_a: np.ndarray,
    images_b: np.ndarray,
    path: Path,
    steps: int = 8,
    digits_a: Sequence[int] | None = None,
    digits_b: Sequence[int] | None = None,
    title: str | None = None,
) -> Path:
    """The paper's Figure 4 as a PNG: per pair, a "common" and a "specific" row (see
    :func:`interpolate`), the inputs A and B at the ends. ``images_*``: (N, C, H, W) uint8."""
    grids = interpolate(vae, images_a, images_b, steps)
    a, b = _unit(images_a).numpy(), _unit(images_b).numpy()
    n = len(a)
    cols = steps + 2
    cell, gap, left, top = 0.62, 0.25, 1.55, 0.75
    rows_h = 2 * n * cell + (n - 1) * gap
    fig_w, fig_h = left + cols * cell + 0.25, top + rows_h + 0.35
    fig = plt.figure(figsize=(fig_w, fig_h))
    height_ratios = []
    for i in range(n):
        height_ratios += [cell, cell] + ([gap] if i < n - 1 else [])
    spec = fig.add_gridspec(
        len(height_ratios),
        cols,
        height_ratios=height_ratios,
        left=left / fig_w,
        right=1 - 0.25 / fig_w,
        top=1 - top / fig_h,
        bottom=0.35 / fig_h,
        wspace=0.06,
        hspace=0.06,
    )
    ts = np.linspace(0.0, 1.0, steps)
    row = 0
    for i in range(n):
        for kind, label in (("common", "common z_c\nA → B"), ("specific", "specific z_s\nA → B")):
            axes = [fig.add_subplot(spec[row, j]) for j in range(cols)]
            _show(axes[0], a[i])
            for j in range(steps):
                _show(axes[1 + j], grids[kind][i, j])
            _show(axes[-1], b[i])
            for ax in (axes[0], axes[-1]):  # the inputs get a frame
                for spine in ax.spines.values():
                    spine.set_visible(True)
                    spine.set_color("tab:orange")
                    spine.set_linewidth(1.5)
            held = "z_s = mu_s(A)" if kind == "common" else "z_c = mu_c(A)"
            axes[0].set_ylabel(
                f"{label}\n({held})", fontsize=7.5, rotation=0, ha="right", va="center", labelpad=6
            )
            if kind == "common":
                da = f" ({digits_a[i]})" if digits_a is not None else ""
                db = f" ({digits_b[i]})" if digits_b is not None else ""
                axes[0].set_title(f"A{da}", fontsize=8, pad=2)
                axes[-1].set_title(f"B{db}", fontsize=8, pad=2)
                if i == 0:
                    for j in range(steps):
                        axes[1 + j].set_title(f"t={ts[j]:.2g}", fontsize=7, pad=2)
            row += 1
        row += 1  # the gap
    fig.suptitle(
        title or "Interpolation in the latent space (Figure 4)",
        fontsize=10,
        y=1 - 0.12 / fig_h,
        va="top",
    )
    fig.text(
        0.5,
        1 - 0.38 / fig_h,
        "common row: only z_c moves A→B (digit should change, rotation/background stay)   "
        "specific row: only z_s moves A→B (digit should stay)",
        ha="center",
        va="top",
        fontsize=7,
        color="dimgray",
    )
    return _save(fig, path, dpi=130)


# ------------------------------------------------------------------------------ Figure 5: embedding


def pca_2d(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) -> (N, 2) coordinates on the first two principal axes, and the fraction of the
    variance each explains, by SVD of the centred features (signs fixed: largest loading > 0)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"expected (N >= 2, D) features, got shape {x.shape}")
    x = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    vt = vt[:2]
    vt *= np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(axis=1)])[:, None]
    coords = x @ vt.T
    if coords.shape[1] < 2:  # one-dimensional features
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    var = s**2
    ratio = var[:2] / var.sum() if var.sum() > 0 else np.zeros(2)
    return coords, np.pad(ratio, (0, 2 - len(ratio)))


def lda_2d(features: np.ndarray, labels: np.ndarray, ridge: float = 1e-6) -> np.ndarray:
    """(N, D) -> (N, 2) on the first two Fisher discriminant axes of ``labels`` (supervised: the
    2-D linear view in which the classes are best separated; mixed classes stay mixed)."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"expected (N, D) features and N labels, got {x.shape} and {y.shape}")
    x = x - x.mean(axis=0)
    classes = np.unique(y)
    means = np.stack([x[y == c].mean(axis=0) for c in classes])  # (K, D)
    within = x - means[np.searchsorted(classes, y)]
    s_w = within.T @ within / len(x)
    s_w += ridge * (np.trace(s_w) / len(s_w) + 1e-12) * np.eye(len(s_w))
    counts = np.array([(y == c).sum() for c in classes], dtype=np.float64)
    s_b = (means.T * counts) @ means / len(x)
    chol = np.linalg.cholesky(s_w)  # s_w = L L^T; whiten, then the eigenvectors of s_b
    inv = np.linalg.inv(chol)
    _, vecs = np.linalg.eigh(inv @ s_b @ inv.T)
    w = inv.T @ vecs[:, ::-1][:, :2]  # the two largest
    coords = x @ w
    if coords.shape[1] < 2:
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    return coords


def embed_2d(
    features: np.ndarray, method: str = "pca", seed: int = 0, labels: np.ndarray | None = None
) -> np.ndarray:
    """(N, D) -> (N, 2) with PCA (numpy), LDA (numpy, needs ``labels``) or t-SNE (needs
    scikit-learn)."""
    if method == "pca":
        return pca_2d(features)[0]
    if method == "lda":
        if labels is None:
            raise ValueError("method='lda' needs the class labels")
        return lda_2d(features, labels)
    if method == "tsne":
        try:
            from sklearn.manifold import TSNE
        except ImportError as err:
            raise ImportError(
                "method='tsne' needs scikit-learn, which is not installed in this environment "
                "(it is not a dependency of the project); use method='pca' or install "
                "scikit-learn yourself"
            ) from err
        x = np.asarray(features, dtype=np.float64)
        perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
        return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    raise ValueError(f"method must be one of {EMBEDDING_METHODS}, not {method!r}")


def embedding_figure(
    vae: DisentangledVAE,
    images: np.ndarray,
    digits: np.ndarray,
    path: Path,
    method: str = "pca",
    title: str | None = None,
    seed: int = 0,
) -> Path:
    """The paper's Figure 5 as a PNG: 2-D embeddings of mu_c (left) and mu_s (right) of
    ``images`` (N, C, H, W), coloured by digit class."""
    if method not in EMBEDDING_METHODS:
        raise ValueError(f"method must be one of {EMBEDDING_METHODS}, not {method!r}")
    digits = np.asarray(digits)
    if len(digits) != len(images):
        raise ValueError(f"{len(images)} images but {len(digits)} digit labels")
    q = encode(vae, images)
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.9))
    classes = np.unique(digits)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    order = np.random.default_rng(seed).permutation(len(digits))  # no class painted over the rest
    for ax, (name, mu) in zip(
        axes, (("common features mu_c", q.mu_c), ("specific features mu_s", q.mu_s)), strict=True
    ):
        feats = mu.numpy()
        if method == "pca":
            coords, ratio = pca_2d(feats)
            ax.set_xlabel(f"PC 1 ({100 * ratio[0]:.0f} % of variance)", fontsize=8)
            ax.set_ylabel(f"PC 2 ({100 * ratio[1]:.0f} % of variance)", fontsize=8)
        else:
            coords = embed_2d(feats, method, seed, labels=digits)
            axis = {"lda": "discriminant", "tsne": "t-SNE"}[method]
            ax.set_xlabel(f"{axis} 1", fontsize=8)
            ax.set_ylabel(f"{axis} 2", fontsize=8)
        colours = np.searchsorted(classes, digits)
        ax.scatter(
            coords[order, 0],
            coords[order, 1],
            c=[cmap(k % cmap.N) for k in colours[order]],
            s=5,
            alpha=0.7,
            linewidths=0,
        )
        ax.set_title(f"{name} ({feats.shape[1]}-d), {method.upper()}", fontsize=9)
        ax.tick_params(labelsize=7)
    handles = [
        plt.Line2D([], [], ls="", marker="o", ms=6, color=cmap(k % cmap.N), label=str(c))
        for k, c in enumerate(classes)
    ]
    fig.legend(
        handles=handles,
        title="digit",
        loc="center right",
        fontsize=8,
        title_fontsize=8,
        frameon=False,
    )
    fig.suptitle(
        title or f"Latent features coloured by digit class (Figure 5), {len(digits)} test images",
        fontsize=10,
    )
    fig.subplots_adjust(left=0.06, right=0.91, bottom=0.11, top=0.86, wspace=0.22)
    return _save(fig, path, dpi=120)


# -------------------------------------------------------------------------------- separability


def _standardise(
    fit_x: np.ndarray, eval_x: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:  # z-scores with the fitting set's statistics
    mean, std = fit_x.mean(axis=0), fit_x.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)
    return (fit_x - mean) / std, (eval_x - mean) / std


def centroid_accuracy(
    fit_x: np.ndarray,
    fit_y: np.ndarray,
    eval_x: np.ndarray,
    eval_y: np.ndarray,
    standardise: bool = True,
) -> float:
    """Accuracy of the nearest class centroid (Euclidean; centroids of ``fit_x`` per class of
    ``fit_y``) on (``eval_x``, ``eval_y``), in [0, 1]. ``standardise`` z-scores every dimension
    with the fitting set's mean and std first, so that no dimension wins by its scale alone."""
    fit_x, eval_x = np.asarray(fit_x, np.float64), np.asarray(eval_x, np.float64)
    fit_y, eval_y = np.asarray(fit_y), np.asarray(eval_y)
    if len(eval_y) == 0:
        raise ValueError("nothing to evaluate")
    if standardise:
        fit_x, eval_x = _standardise(fit_x, eval_x)
    classes = np.unique(fit_y)
    centroids = np.stack([fit_x[fit_y == c].mean(axis=0) for c in classes])  # (K, D)
    d2 = ((eval_x[:, None, :] - centroids[None]) ** 2).sum(axis=2)  # (N, K)
    return float((classes[d2.argmin(axis=1)] == eval_y).mean())


def linear_probe_accuracy(
    fit_x: np.ndarray,
    fit_y: np.ndarray,
    eval_x: np.ndarray,
    eval_y: np.ndarray,
    weight_decay: float = 1e-3,
    iterations: int = 200,
) -> float:
    """Accuracy of a multinomial logistic regression (standardised features, L2-regularised,
    L-BFGS in torch) fitted on (``fit_x``, ``fit_y``) and scored on (``eval_x``, ``eval_y``)."""
    fx, ex = _standardise(np.asarray(fit_x, np.float64), np.asarray(eval_x, np.float64))
    classes = np.unique(fit_y)
    fy = torch.from_numpy(np.searchsorted(classes, fit_y))
    fx_t, ex_t = torch.from_numpy(fx).float(), torch.from_numpy(ex).float()
    torch.manual_seed(0)
    probe = torch.nn.Linear(fx.shape[1], len(classes))
    opt = torch.optim.LBFGS(probe.parameters(), max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(fx_t), fy)
        loss = loss + weight_decay * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = classes[probe(ex_t).argmax(dim=1).numpy()]
    return float((pred == np.asarray(eval_y)).mean())


def swap_effect(
    vae: DisentangledVAE, images_a: np.ndarray, images_b: np.ndarray
) -> dict[str, float]:
    """Figure 4 in two numbers: how far (mean absolute pixel change, x 100) the reconstruction of
    A moves when its common features are replaced by B's (``swap_change_common``: decode(mu_c(B),
    mu_s(A))) and when its specific features are (``swap_change_specific``: decode(mu_c(A),
    mu_s(B))), and how far B's reconstruction is from A's (``swap_change_both``). For pairs of
    different digits, a decoder that uses z_c for the digit has ``common`` well above 0."""
    qa, qb = encode(vae, images_a), encode(vae, images_b)
    rec_a = decode(vae, qa.mu_c, qa.mu_s)
    out = {
        "swap_change_common": decode(vae, qb.mu_c, qa.mu_s),
        "swap_change_specific": decode(vae, qa.mu_c, qb.mu_s),
        "swap_change_both": decode(vae, qb.mu_c, qb.mu_s),
    }
    return {k: 100 * float(np.abs(v - rec_a).mean()) for k, v in out.items()}


def separability(
    vae: DisentangledVAE,
    fit_images: np.ndarray,
    fit_digits: np.ndarray,
    eval_images: np.ndarray,
    eval_digits: np.ndarray,
) -> dict[str, float]:
    """How readable the digit class is from mu_c and from mu_s, fitted on one set of images and
    scored on another: nearest-centroid and linear-probe accuracy in %, with the chance level."""
    qf, qe = encode(vae, fit_images), encode(vae, eval_images)
    out: dict[str, float] = {}
    for part, fit_mu, eval_mu in (("common", qf.mu_c, qe.mu_c), ("specific", qf.mu_s, qe.mu_s)):
        f, e = fit_mu.numpy(), eval_mu.numpy()
        out[f"centroid_acc_{part}"] = 100 * centroid_accuracy(f, fit_digits, e, eval_digits)
        out[f"linear_acc_{part}"] = 100 * linear_probe_accuracy(f, fit_digits, e, eval_digits)
    counts = np.unique(np.asarray(eval_digits), return_counts=True)[1]
    out["chance_acc"] = 100 * float(counts.max() / counts.sum())  # always the commonest class
    out["n_fit"], out["n_eval"] = float(len(fit_digits)), float(len(eval_digits))
    return out


# ------------------------------------------------------------------------------------ checkpoints


def load_pretrained_vae(path: Path, model_config: ModelConfig) -> DisentangledVAE:
    """The VAE of a pre-training checkpoint (``pretrain_last.pt`` of :class:`EpochCheckpoints`:
    {"model": state_dict, ...}); also accepts a bare state dict or a final checkpoint's
    ``vae_state``. Returned in eval mode."""
    return _vae_from_payload(_read(path), model_config, path)


def _read(path: Path) -> dict:
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)  # tensors, no code
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: expected a dict, found {type(payload).__name__}")
    return payload


def _vae_from_payload(payload: dict, model_config: ModelConfig, path: Path) -> DisentangledVAE:
    state = payload.get("model", payload.get("vae_state", payload))
    vae = DisentangledVAE(model_config)
    try:
        vae.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(
            f"{path} does not hold a DisentangledVAE of this model config ({model_config}): {err}"
        ) from err
    return vae.eval()


def make_figures(
    checkpoint: Path,
    variant: str,
    out_dir: Path,
    seed: int = 0,
    n_per_class: int = 2000,
    n_pairs: int = 5,
    steps: int = 8,
    n_embed: int = 3000,
    method: str = "pca",
    model_config: ModelConfig | None = None,
) -> tuple[list[Path], dict[str, float]]:
    """Figures 4 and 5 and the separability scores for one pre-training checkpoint.

    Test pairs: ``make_pairs(variant, "test", n_per_class, n_per_class, seed)``. Figure 4 uses
    ``n_pairs`` changed pairs (A and B different digits, A's digits all different); Figure 5 the
    first ``n_embed`` "before" images. The scores fit on the "before" images and are scored on the
    "after" images (other images of the test split, or other augmentations of them);
    :func:`swap_effect` is measured on all changed pairs. Writes
    ``out_dir/interpolation_<variant>.png`` and ``out_dir/embedding_<variant>.png``; returns
    (those paths, scores)."""
    if model_config is None:
        from training.experiments.table3 import MNIST_MODEL

        model_config = MNIST_MODEL
    payload = _read(checkpoint)
    vae = _vae_from_payload(payload, model_config, checkpoint)
    epoch = payload.get("epoch")
    pairs = make_pairs(variant, "test", n_per_class, n_per_class, seed)  # type: ignore[arg-type]
    out_dir = Path(out_dir)

    changed = np.flatnonzero(pairs.label == 1)
    _, first = np.unique(pairs.digits_a[changed], return_index=True)  # one pair per digit of A
    pick = np.random.default_rng(seed).permutation(changed[first])[:n_pairs]
    tag = f"{variant}, {Path(checkpoint).parent.name}"
    if isinstance(epoch, int):
        tag += f", after epoch {epoch}"
    interp = interpolation_figure(
        vae,
        pairs.before[pick],
        pairs.after[pick],
        out_dir / f"interpolation_{variant}.png",
        steps=steps,
        digits_a=pairs.digits_a[pick].tolist(),
        digits_b=pairs.digits_b[pick].tolist(),
        title=f"Interpolation in the latent space (Figure 4): {tag}",
    )
    scores = separability(vae, pairs.before, pairs.digits_a, pairs.after, pairs.digits_b)
    scores.update(swap_effect(vae, pairs.before[changed], pairs.after[changed]))
    n = min(n_embed, len(pairs))
    embed = embedding_figure(
        vae,
        pairs.before[:n],
        pairs.digits_a[:n],
        out_dir / f"embedding_{variant}.png",
        method=method,
        seed=seed,
        title=(
            f"Latent features by digit class (Figure 5): {tag}, {n} test images\n"
            f"digit accuracy from mu_c: centroid {scores['centroid_acc_common']:.1f} %, "
            f"linear {scores['linear_acc_common']:.1f} %   |   from mu_s: centroid "
            f"{scores['centroid_acc_specific']:.1f} %, linear "
            f"{scores['linear_acc_specific']:.1f} %   (chance {scores['chance_acc']:.0f} %)"
        ),
    )
    log.info("%s separability: %s", variant, scores)
    return [interp, embed], scores


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a pretrain_last.pt")
    parser.add_argument("--variant", default="MNIST-R")
    parser.add_argument("--out", type=Path, default=Path("figures"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-class", type=int, default=2000)
    parser.add_argument("--method", choices=EMBEDDING_METHODS, default="pca")
    args = parser.parse_args(argv)
    paths, scores = make_figures(
        args.checkpoint, args.variant, args.out, args.seed, args.per_class, method=args.method
    )
    for p in paths:
        print(p)
    for k, v in scores.items():
        print(f"{k}: {v:.1f}")


if __name__ == "__main__":
    main()
