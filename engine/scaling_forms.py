"""Scaling-law forms fitted to the same points, compared in-sample (BIC) and on held-out rows.

Forms (x = params or data size, L = loss; all fitted on ln L, the error scale of RMSLE):
  power       L = exp(a) * x^-alpha                                 (2 parameters, exact)
  saturating  L = E + A * x^-alpha                                  (3)
  broken      two-segment power law, exact global fit               (4, engine.scaling_breakpoint)
  bnsl        L = a + b x^-c0 (1 + (x/d1)^(1/f1))^(-c1 f1)          (6, Caballero et al. 2022)
  chinchilla  L = E + A / N^alpha + B / D^beta, Huber on ln L       (5, Hoffmann et al. 2022, App. 3)
Nonlinear forms start from a vectorised grid (variable projection: for fixed exponents the
linear coefficients are a 2-column least-squares problem) and are polished with scipy from the
best few starts, so the result does not hinge on one initial guess.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import optimize

from engine.scaling_breakpoint import fit_breakpoint, validate_xy
from engine.validation import check_choice, check_int

FORMS = ("power", "saturating", "broken", "bnsl", "chinchilla")


@dataclass(frozen=True)
class FormFit:
    """One fitted form: its parameters (original units) and how many there are."""

    form: str
    params: dict[str, float] = field(default_factory=dict)

    @property
    def n_params(self) -> int:
        """Number of fitted parameters (the breakpoint counts as one)."""
        return {"power": 2, "saturating": 3, "broken": 4, "bnsl": 6, "chinchilla": 5}[self.form]

    def predict(self, x: np.ndarray, nd: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """Predicted loss at sizes `x` (G,); chinchilla uses `nd` = (params N, tokens D), each (G,)."""
        p, x = self.params, np.asarray(x, dtype=float)
        lx = np.log(x)
        if self.form == "power":
            return np.exp(p["ln_a"] - p["alpha"] * lx)
        if self.form == "saturating":
            return p["E"] + p["A"] * np.exp(-p["alpha"] * lx)
        if self.form == "broken":
            c = np.log(p["breakpoint"])
            return np.exp(p["intercept"] + p["slope_before"] * np.minimum(lx, c)
                          + p["slope_after"] * np.maximum(lx - c, 0))
        if self.form == "bnsl":
            return p["a"] + np.exp(_bnsl_log_g(lx, np.log(p["b"]), p["c0"], p["c1"], np.log(p["d1"]), p["f1"]))
        if nd is None:
            raise ValueError("the chinchilla form needs params and tokens columns to predict")
        n, d = (np.asarray(a, float) for a in nd)
        return p["E"] + p["A"] * n ** -p["alpha"] + p["B"] * d ** -p["beta"]


def rmsle(pred: np.ndarray, actual: np.ndarray) -> float:
    """Root mean squared error of natural logs (the BNSL paper's RMSLE)."""
    d = np.log(np.asarray(pred, float)) - np.log(np.asarray(actual, float))
    return float(np.sqrt(np.mean(d * d))) if d.size else float("nan")


def _safe_log(z: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(z, 1e-300))


# ---------------------------------------------------------------- single and saturating


def fit_power(x: np.ndarray, y: np.ndarray) -> FormFit:
    """Least-squares line of ln L on ln x: L = exp(ln_a) * x^-alpha."""
    slope, icpt = np.polyfit(np.log(x), np.log(y), 1)
    return FormFit("power", {"ln_a": float(icpt), "alpha": float(-slope)})


def _two_col_fit(basis: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row g of basis (K, n): least squares y ~ c0 + c1 * g with c0, c1 >= 0, clipped."""
    gm, ym = basis.mean(1, keepdims=True), y.mean()
    gc = basis - gm
    c1 = np.maximum((gc * (y - ym)).sum(1) / np.maximum((gc * gc).sum(1), 1e-300), 0.0)
    c0 = np.maximum(ym - c1 * gm[:, 0], 0.0)
    return c0, c1


def fit_saturating(x: np.ndarray, y: np.ndarray) -> FormFit:
    """L = E + A x^-alpha (E, A >= 0), least squares on ln L from a grid of alpha."""
    lx = np.log(x) - np.log(x).mean()  # centre so A is well scaled
    ly = np.log(y)
    alphas = np.linspace(0.01, 3.0, 120)
    g = np.exp(-alphas[:, None] * lx)
    E, A = _two_col_fit(g, y)
    err = ((_safe_log(E[:, None] + A[:, None] * g) - ly) ** 2).sum(1)
    i = int(np.argmin(err))

    def resid(p: np.ndarray) -> np.ndarray:
        return _safe_log(p[0] + p[1] * np.exp(-p[2] * lx)) - ly

    r = optimize.least_squares(resid, [E[i], max(A[i], 1e-12), alphas[i]],
                               bounds=([0, 0, 0], [np.inf, np.inf, 10]), method="trf")
    e, a, al = r.x
    # The solver stops short of the bound E = 0 (1.5e-17 on the BNSL table, 3e-6 on an exact power
    # law): the pure power law (E = 0, ln-ln least squares) is taken when it fits at least as well.
    slope, icpt = np.polyfit(lx, ly, 1)
    pure = np.array([0.0, np.exp(icpt), -slope])
    if 0 <= -slope <= 10 and (resid(pure) ** 2).sum() <= (resid(r.x) ** 2).sum():
        e, a, al = pure
    return FormFit("saturating", {"E": float(e), "A": float(a * np.exp(al * np.log(x).mean())),
                                  "alpha": float(al)})


# ---------------------------------------------------------------- BNSL


def _bnsl_log_g(lx: np.ndarray, lb: float | np.ndarray, c0: float | np.ndarray, c1: float | np.ndarray,
                ld: float | np.ndarray, f: float | np.ndarray) -> np.ndarray:
    """ln of b x^-c0 (1 + (x/d)^(1/f))^(-c1 f), computed stably with logaddexp."""
    return lb - c0 * lx - c1 * f * np.logaddexp(0.0, (lx - ld) / f)


def fit_bnsl(x: np.ndarray, y: np.ndarray, n_starts: int = 4, max_nfev: int = 100) -> FormFit:
    """Smoothly broken power law with one break, least squares on ln L, grid then polish."""
    lx_all = np.log(x)
    xs = lx_all.mean()
    lx, ly = lx_all - xs, np.log(y)
    span = lx.max() - lx.min()
    c0s = np.linspace(-0.5, 1.5, 9)
    c1s = np.array([0.0, 0.25, 0.5, 1, 2, 4, 8, 16])
    lds = np.linspace(lx.min() - 0.25 * span, lx.max() + 0.25 * span, 16)
    fs = np.array([0.02, 0.05, 0.1, 0.2, 0.5, 1.0])
    G = np.stack(np.meshgrid(c0s, c1s, lds, fs, indexing="ij"), -1).reshape(-1, 4)
    g = np.exp(np.clip(_bnsl_log_g(lx[None], 0.0, *(G[:, i:i + 1] for i in range(4))), -700, 700))
    a, b = _two_col_fit(g, y)
    err = ((_safe_log(a[:, None] + b[:, None] * g) - ly) ** 2).sum(1)

    def resid(p: np.ndarray) -> np.ndarray:
        lg = _bnsl_log_g(lx, p[1], p[2], p[3], p[4], np.exp(p[5]))
        return _safe_log(p[0] + np.exp(np.clip(lg, -700, 700))) - ly

    def jac(p: np.ndarray) -> np.ndarray:
        a, _, _, c1, ld, f = *p[:5], np.exp(p[5])
        g = np.exp(np.clip(_bnsl_log_g(lx, p[1], p[2], c1, ld, f), -700, 700))
        z = (lx - ld) / f
        sp, sig = np.logaddexp(0.0, z), 0.5 * (1.0 + np.tanh(0.5 * z))  # softplus and its slope
        s = g / np.maximum(a + g, 1e-300)  # d r / d ln g
        return np.stack([1.0 / np.maximum(a + g, 1e-300), s, -s * lx, -s * f * sp, s * c1 * sig,
                         -s * c1 * f * (sp - z * sig)], axis=1)

    lo = [0, -np.inf, -5, -5, lx.min() - span, np.log(1e-3)]
    hi = [np.inf, np.inf, 10, 100, lx.max() + span, np.log(10.0)]
    best = None
    for i in np.argsort(err)[:n_starts]:
        p0 = [a[i], np.log(max(b[i], 1e-12)), *G[i, :3], np.log(G[i, 3])]
        p0 = np.clip(p0, np.add(lo, 1e-9), np.subtract(hi, 1e-9))
        r = optimize.least_squares(resid, p0, jac=jac, bounds=(lo, hi), method="trf", max_nfev=max_nfev)
        if best is None or r.cost < best.cost:
            best = r
    p = best.x
    # Undo the centring: (x/d) is scale free once d is shifted; b absorbs x^-c0 of the centre.
    return FormFit("bnsl", {"a": float(p[0]), "b": float(np.exp(p[1] + p[2] * xs)), "c0": float(p[2]),
                            "c1": float(p[3]), "d1": float(np.exp(p[4] + xs)), "f1": float(np.exp(p[5]))})


# ---------------------------------------------------------------- Chinchilla L(N, D)


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    a = np.abs(r)
    quad = a <= delta
    return np.where(quad, 0.5 * r * r, delta * (a - 0.5 * delta)), np.where(quad, r, delta * np.sign(r))


def fit_chinchilla(n: np.ndarray, d: np.ndarray, y: np.ndarray, delta: float = 1e-3,
                   n_starts: int = 4) -> FormFit:
    """L(N, D) = E + A/N^alpha + B/D^beta by Huber(delta) loss on ln L, as in Hoffmann et al.
    Approach 3: ln L ~ logsumexp(a - alpha ln N, b - beta ln D, e); grid of starts, then L-BFGS."""
    ln, ld, ly = np.log(n), np.log(d), np.log(y)
    grid = np.stack(np.meshgrid(np.arange(0, 30, 5.0), np.arange(0, 30, 5.0), np.arange(-1, 1.5, 0.5),
                                np.arange(0, 2.5, 0.5), np.arange(0, 2.5, 0.5), indexing="ij"), -1)
    grid = grid.reshape(-1, 5)  # a, b, e, alpha, beta

    def terms(p: np.ndarray) -> np.ndarray:
        p = np.atleast_2d(p)
        return np.stack([p[:, :1] - p[:, 3:4] * ln, p[:, 1:2] - p[:, 4:5] * ld,
                         np.broadcast_to(p[:, 2:3], (p.shape[0], ln.size))])

    def objective(p: np.ndarray) -> tuple[float, np.ndarray]:
        t = terms(p)[:, 0]  # (3, n)
        lse = np.logaddexp.reduce(t, axis=0)
        loss, dl = _huber(lse - ly, delta)
        sm = np.exp(t - lse)  # softmax weights: d lse / d term
        grad = np.array([(dl * sm[0]).sum(), (dl * sm[1]).sum(), (dl * sm[2]).sum(),
                         -(dl * sm[0] * ln).sum(), -(dl * sm[1] * ld).sum()])
        return float(loss.sum()), grad

    start_loss = _huber(np.logaddexp.reduce(terms(grid), axis=0) - ly, delta)[0].sum(1)
    best = None
    for i in np.argsort(start_loss)[:n_starts]:
        r = optimize.minimize(objective, grid[i], jac=True, method="L-BFGS-B",
                              options={"maxiter": 2000, "gtol": 1e-10, "ftol": 1e-13})
        if best is None or r.fun < best.fun:
            best = r
    a, b, e, al, be = best.x
    return FormFit("chinchilla", {"E": float(np.exp(e)), "A": float(np.exp(a)), "B": float(np.exp(b)),
                                  "alpha": float(al), "beta": float(be)})


# ---------------------------------------------------------------- comparison


def fit_form(form: str, x: np.ndarray, y: np.ndarray, nd: tuple[np.ndarray, np.ndarray] | None = None,
             min_segment: int = 2) -> FormFit:
    """Fit one named form to sizes x (n,) and losses y (n,); chinchilla uses nd = (N, D), (n,) each."""
    check_choice("form", form, FORMS)
    if form == "power":
        return fit_power(x, y)
    if form == "saturating":
        return fit_saturating(x, y)
    if form == "broken":
        m = fit_breakpoint(x, y, min_segment=min_segment)
        return FormFit("broken", {k: float(v) for k, v in m.summary.items()
                                  if k in ("breakpoint", "slope_before", "slope_after", "intercept")})
    if form == "bnsl":
        return fit_bnsl(x, y)
    if nd is None:
        raise ValueError("the chinchilla form needs params and tokens columns")
    return fit_chinchilla(nd[0], nd[1], y)


def compare_forms(x: object, y: object, train: object = None,
                  nd: tuple[np.ndarray, np.ndarray] | None = None,
                  forms: tuple[str, ...] | list[str] = ("power", "saturating", "broken", "bnsl"),
                  min_segment: int = 2) -> tuple[pd.DataFrame, dict[str, FormFit]]:
    """Fit each form on the `train` rows (bool mask (n,), default all) and score every form.

    Returns a table (form, parameters, train RMSLE, BIC on train, hold-out RMSLE on the other rows)
    and the fits by name. Losses in RMSLE are natural-log errors.
    """
    xa, ya = validate_xy(x, y, "x", "y")
    mask = np.ones(xa.size, bool) if train is None else np.asarray(train, dtype=bool)
    if mask.shape != xa.shape:
        raise ValueError(f"train mask must have shape {xa.shape}, got {mask.shape}")
    n_tr = int(mask.sum())
    check_int("training rows", n_tr, 4)
    if nd is not None:
        nd = validate_xy(nd[0], nd[1], "params N", "tokens D", min_distinct=1)
        if nd[0].shape != xa.shape:
            raise ValueError(f"params N and tokens D must have {xa.size} rows, got {nd[0].size}")
    rows, fits = [], {}
    for form in forms:
        if form == "chinchilla" and nd is None:
            continue
        if form == "broken" and n_tr < 2 * min_segment:
            continue
        nd_tr = (nd[0][mask], nd[1][mask]) if nd is not None else None
        fit = fit_form(form, xa[mask], ya[mask], nd_tr, min_segment)
        fits[form] = fit
        pred = fit.predict(xa, nd)
        r = np.log(pred) - np.log(ya)
        sse = float(np.sum(r[mask] ** 2))
        rows.append({"form": form, "parameters": fit.n_params,
                     "train_rmsle": float(np.sqrt(np.mean(r[mask] ** 2))),
                     "bic": n_tr * np.log(max(sse, 1e-300) / n_tr) + fit.n_params * np.log(n_tr),
                     "holdout_rmsle": float(np.sqrt(np.mean(r[~mask] ** 2))) if (~mask).any() else np.nan,
                     "fit": ", ".join(f"{k}={v:.4g}" for k, v in fit.params.items())})
    return pd.DataFrame(rows), fits


def holdout_mask(n: int, first_k: int | None = None, split: object = None,
                 train_label: str = "train") -> np.ndarray:
    """Training rows: those whose `split` equals `train_label`, else the first `first_k` rows
    (in the given order; sort by size first for extrapolation), else all."""
    if split is not None:
        s = np.asarray(split).astype(str)
        if s.shape != (n,):
            raise ValueError(f"split must have {n} entries, got {s.shape}")
        if not (s == train_label).any():
            raise ValueError(f"split has no rows labelled {train_label!r}; labels: {sorted(set(s))[:10]}")
        return s == train_label
    if first_k is None:
        return np.ones(n, bool)
    k = check_int("first_k", first_k, 4, n)
    return np.arange(n) < k


def smooth_rivals(table: pd.DataFrame, margin: float = 2.0) -> list[tuple[str, float]]:
    """Smooth forms (saturating, BNSL) of a compare_forms table whose BIC is below the two-segment
    law's or within `margin` above it: (form, BIC minus the break's), best first. A BIC difference
    under 2 is barely worth a mention (Kass and Raftery 1995), so such a form explains the points
    about as well with a gradual bend as the break does with a knee."""
    bic = dict(zip(table["form"], table["bic"])) if len(table) else {}
    if "broken" not in bic:
        return []
    rivals = [(f, float(bic[f] - bic["broken"])) for f in ("saturating", "bnsl") if f in bic]
    return sorted([r for r in rivals if r[1] < margin], key=lambda r: r[1])
