"""Parity tolerances, derived from float32 arithmetic rather than measured: the one home of the
error model that every comparison in tests/parity states its bound with.

Why. jaxdiff (XLA) and the PyTorch references compute the same formulas in float32, but round
differently: other vector widths (AVX2, AVX-512, AMX), fused multiply-adds, summation orders in
matmuls and convolutions (oneDNN / MKL blocking vs XLA's), other exp / log / tanh / sin
approximations. Those choices differ between CPUs, so a bound set just above what one machine
measured fails on the next (issue 24: 1.049e-5 against 1e-5 on an Intel Sapphire Rapids host). A
bound here is instead an upper estimate of how far two float32 implementations of the formula can
drift apart, from the magnitude of the values, the number of operations and the number of steps;
it holds on any IEEE float32 machine. Each test states its use of these helpers next to the
comparison; the ratio error / bound of every comparison is printed by
``pytest tests/parity/<file> -n 0 --parity-ratios=FILE`` (see tests/conftest.py), and should stay
well below 1 (about 1/3 or less on the machine that ran the suite last).

The model.

- ``EPS32 = 2**-23`` is one ulp of 1.0. An IEEE operation (+ - * / sqrt, fma) rounds to nearest:
  relative error <= EPS32 / 2. Library functions (exp, log, tanh, sin, cos, pow) are not correctly
  rounded: XLA's and torch's (SLEEF, MKL, glibc) err by up to about 1-2 ulp. Two implementations
  each round, so their results differ by at most the sum of both sides' errors.
- The margin: every rounding is counted as a full ulp of its largest operand (``EPS32``
  relative), twice round-to-nearest's worst case; library functions as 2 ulps. This factor, not a
  measurement, is what keeps a comparison that hits the worst case at about half its bound.
- Elementwise formulas (schedules, sigma grids, one sampler update): ``k`` roundings per side of
  values up to ``scale`` give ``|diff| <= ulps(2 k, scale)``; where the formula subtracts nearly
  equal numbers or divides by a small one, the bound is multiplied by that operation's condition
  number (``|a| / |a - b|``, ``1 / |b|``), computed from the values, and the test says so.
- Trajectories (samplers, ``trajectory_atol``): a sampler step is a model evaluation (the tests'
  analytic stand-ins: about 12 roundings, ``sqrt``, ``tanh`` and ``cos`` included) and an update
  (about 4-10 roundings, ``exp`` / ``expm1`` in the exponential integrators, the multistep history
  combination): about 16 roundings of at most 1 ulp of the step's largest operand on each side, so
  ``STEP_ULPS = 32`` ulps per step for the two sides together. The stand-ins are (nearly) the exact
  denoiser of Gaussian data, whose probability-flow maps contract (the marginal std shrinks towards
  the data's), so an error made at one step is carried to the end with a factor <= 1 and the
  errors of ``N`` steps add at most linearly: ``STEP_ULPS * EPS32 * scale * N``. A step that
  divides an O(1) rounding by a small number (an eps model's ``x0 = (x - sigma eps) / alpha``, a
  division by ``sigma_{i+1}``) or multiplies the state by a growth factor carries that factor as
  ``gain``, evaluated from the grid by the test.
- Networks (``network_rtol``, relative to ``max |reference|``): each layer is a sum over its
  ``fan_in`` inputs, which the two sides evaluate in different orders. The rounding errors of a
  sum of ``n`` terms (each <= ``EPS32 / 2`` of a partial sum, of random sign) add up to about
  ``sqrt(n) EPS32 / 2`` of its magnitude (the probabilistic bound of Higham and Mary, "A New
  Approach to Probabilistic Rounding Error Analysis", SIAM J. Sci. Comput. 2019); for both sides
  ``sqrt(fan_in) EPS32``. Normalisation layers keep activations O(1), so relative errors of
  successive layers add: over ``depth`` layers ``depth sqrt(fan_in) EPS32``. ``depth`` counts every
  ``Conv2d`` and ``Linear`` layer of the model (:func:`torch_layers`), parallel branches
  included, which over-counts the longest path by more than the attention products it leaves out;
  and the layers' independent errors add in quadrature, not linearly, so the sum is a bound on the
  largest output, not only a typical one.
"""

from __future__ import annotations

import math

import numpy as np

EPS32 = 2.0**-23  # one ulp of 1.0 in float32 (np.finfo(np.float32).eps)
STEP_ULPS = 32  # one sampler step, both sides: ~16 roundings of <= 1 ulp each (module docstring)

# The comparisons made during the current test: (what, error / bound). tests/parity/conftest.py
# empties it before each test and reports it afterwards (``--parity-ratios``).
RECORDS: list[tuple[str, float]] = []


def ulps(n: float, scale=1.0):
    """``n`` float32 ulps of a value of magnitude ``scale``: ``n * EPS32 * scale`` (``scale`` may
    be an array, for elementwise bounds)."""
    return n * EPS32 * np.asarray(scale, np.float64)


def trajectory_atol(num_steps: int, scale=1.0, gain=1.0) -> float:
    """The bound on ``|jaxdiff - reference|`` along a float32 sampling trajectory of
    ``num_steps`` steps whose values are at most ``scale`` in magnitude (take the largest
    ``|x|`` of the compared trajectory, ``x_T`` included): ``STEP_ULPS * EPS32 * scale *
    num_steps * gain``, with ``gain`` >= 1 the largest amplification of one step's rounding that
    the test states (module docstring)."""
    return float(STEP_ULPS * EPS32 * float(scale) * num_steps * float(gain))


# x0 = (x - sigma eps) / alpha for an eps model: at large t, eps ~ x / sigma carries the roundings
# of the model's last operations at |x|'s scale ((x - alpha x0) / sigma: 2), then the product
# sigma eps and the subtraction: 4 roundings at |x|'s scale a side, whose sum the division by alpha
# amplifies (the rest of the step rounds at the scale of its O(1) result).
CONVERSION_ULPS = 8


def stepwise_atol(scale, x0_gains, next_gains=None):
    """Per-step bounds ``(samples [N], clean estimates [N])`` for a trajectory of ``N`` steps
    compared step by step (each side running its own trajectory), values at most ``scale``.

    Step ``i`` adds its own roundings, ``STEP_ULPS`` ulps of ``scale``, and, for an eps model, the
    roundings of the conversion ``x0 = (x - sigma_t eps) / alpha_t``: ``CONVERSION_ULPS`` ulps of
    ``|x|``, divided by ``alpha_t`` (``x0_gains[i] = 1 / alpha_t``; 0 for x0 and v models, whose
    conversions do not divide) and carried into the next sample by that update's coefficient of
    ``x0`` (``next_gains[i] = coefficient / alpha_t``, e.g. ``sqrt(abar_prev) / alpha_t`` for
    DDIM; default: the same as ``x0_gains``). Errors of earlier steps are carried with a factor <=
    1 (the stand-ins' flows contract, module docstring), so the sample bound is the running sum and
    a step's clean estimate gets the bound of the sample it was computed from plus its own."""
    x0_gains = np.asarray(x0_gains, np.float64)
    next_gains = x0_gains if next_gains is None else np.asarray(next_gains, np.float64)
    own = STEP_ULPS * EPS32 * float(scale)
    conv = CONVERSION_ULPS * EPS32 * float(scale)
    samples = np.cumsum(own + conv * next_gains)
    before = np.concatenate([[0.0], samples[:-1]])
    return samples, before + own + conv * x0_gains


def multistep_gains(sigmas, order: int = 1):
    """``[N]`` gains for :func:`stepwise_atol` of an exponential-integrator step (DPM-Solver(++),
    UniPC) on the sigma-space grid ``sigmas [N + 1]`` (``sigma = sigma_t / alpha_t``, descending,
    possibly ending at 0).

    A step from ``t`` to ``s`` either converts an eps model's output to x0 (``/ alpha_t``) and
    scales it by ``alpha_s (1 - e^{-h})`` (data prediction), or multiplies ``x`` by ``alpha_s /
    alpha_t > 1`` against an eps term of the same size (noise prediction): a rounding at ``|x|``'s
    scale grows by up to ``alpha_s / alpha_t`` either way. An order-``k`` step also combines the
    current and ``k - 1`` earlier estimates through divided differences, each dividing by a ratio
    ``r = h_prev / h`` of step sizes in ``lambda = -log sigma`` (multiplied by phi-functions <= 1):
    weights at most ``C = 1 + 2 / r_i`` (order 2), ``+ 2 / r_{i-1} (1 + 1 / (r_i + r_{i-1}))``
    (order 3). A last step to ``sigma = 0`` is first order (``C = 1``). Returns
    ``C_i alpha_s / alpha_t``."""
    sig = np.asarray(sigmas, np.float64)
    alpha = 1 / np.sqrt(1 + sig**2)
    with np.errstate(divide="ignore"):
        lam = -np.log(sig)
    h = lam[1:] - lam[:-1]
    C = np.ones(len(h))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.concatenate([[np.inf], h[:-1] / h[1:]])  # r_i = h_{i-1} / h_i
        if order >= 2:
            C[1:] += 2 / r[1:]
        if order >= 3:
            C[2:] += 2 / r[1:-1] * (1 + 1 / (r[2:] + r[1:-1]))
    C[~np.isfinite(h) | ~np.isfinite(C)] = 1.0
    return C * alpha[1:] / alpha[:-1]


def network_rtol(depth: int, fan_in: int) -> float:
    """The bound on ``max |jaxdiff - reference| / max |reference|`` for a float32 network of
    ``depth`` layers whose widest sum has ``fan_in`` terms: ``depth * sqrt(fan_in) * EPS32``
    (module docstring)."""
    return float(depth * math.sqrt(fan_in) * EPS32)


def timestep_embedding_atol(t_max: float) -> float:
    """The bound on ``|jaxdiff - diffusers|`` of sinusoidal timestep features ``sin / cos(t
    freq_i)``, ``freq_i = exp(e_i)``, ``e_i = -log(max_period) i / (half - shift)``, for ``t <=
    t_max``. Per side: ``e_i``'s two roundings (``2 EPS32 |e_i|``) change the argument by ``2 EPS32
    t |e_i| e^{-|e_i|} <= 2 EPS32 t / e``; exp's 2 ulps by ``2 EPS32 t freq_i <= 2 EPS32 t``; the
    product's rounding by ``EPS32 t``; sin / cos add 2 ulps of their O(1) result. Both sides:
    ``2 EPS32 (t_max (2 / e + 3) + 2)`` (9e-4 at t = 999: arguments up to 999 hold only ~1e-4
    absolute in float32)."""
    return float(2 * EPS32 * (t_max * (2 / math.e + 3) + 2))


def sigma_space_grid(scheduler) -> np.ndarray:
    """A diffusers scheduler's grid as sigma-space noise levels ``[N + 1]`` for
    :func:`multistep_gains`: its ``sigmas`` where it keeps them, else ``sqrt((1 - abar) / abar)``
    at its timesteps (``abar`` at least diffusers' ``2**-24`` floor) and a final 0."""
    if hasattr(scheduler, "sigmas"):
        sig = np.asarray(scheduler.sigmas, np.float64)
    else:
        acp = np.asarray(scheduler.alphas_cumprod, np.float64)
        t = np.clip(np.round(np.asarray(scheduler.timesteps, np.float64)).astype(int), 0,
                    len(acp) - 1)
        a = np.maximum(acp[t], 2.0**-24)
        sig = np.concatenate([np.sqrt((1 - a) / a), [0.0]])
    return np.minimum(sig, math.sqrt((1 - 2.0**-24) / 2.0**-24))


def pipeline_rtol(pipe, guidance_scale: float, *, rescale: bool = False,
                  encode: bool = False) -> float:
    """The bound on a diffusers Stable Diffusion pipeline's final latents against jaxdiff's,
    relative to ``max(1, max |latents|)``, after a run (``pipe.scheduler`` holds the grid): per
    UNet call, the UNet and text encoder as one float32 network (:func:`network_rtol`) plus the
    timestep features' bound at the call's timestep (:func:`timestep_embedding_atol`), times the
    guidance's weight on the two branches' errors (``|1 - w| + |w|``; twice that with
    ``guidance_rescale``, whose std ratio carries both stds' errors) and ``1 + g`` with ``g`` the
    step's :func:`multistep_gains` (an eps prediction's x0 conversion, the multistep weights of
    the scheduler's ``solver_order``, + 1 for UniPC's corrector), and the step's own roundings; the
    calls' errors add. ``encode``: image-to-image's VAE encoding (:func:`network_rtol` of the VAE)
    starts the latents."""
    config = pipe.scheduler.config
    order = config.get("solver_order", 1) + ("UniPC" in type(pipe.scheduler).__name__)
    gains = multistep_gains(sigma_space_grid(pipe.scheduler), order)
    ts = np.asarray(pipe.scheduler.timesteps, np.float64)
    ts = ts if len(ts) == len(gains) else np.full(len(gains), ts.max())
    net = network_rtol(*torch_layers(pipe.unet, pipe.text_encoder))
    net = net + np.array([timestep_embedding_atol(t) for t in ts])
    w = abs(1 - guidance_scale) + abs(guidance_scale) if guidance_scale != 1 else 1.0
    if rescale:
        w *= 2
    local = net * w * (1 + gains) + STEP_ULPS * EPS32 + CONVERSION_ULPS * EPS32 * gains
    start = network_rtol(*torch_layers(pipe.vae)) if encode else 0.0
    return float(start + local.sum())


def image_atol(pipe, latent_rtol: float, latents, decoded) -> float:
    """The bound on images ``clamp(decoded / 2 + 0.5, 0, 1)`` decoded from latents within
    ``latent_rtol`` (relative to ``max(1, max |latents|)``): the VAE as a float32 network
    (:func:`network_rtol`) carries the latents' relative error with a factor ~1 and adds its own;
    half of that relative to ``max |decoded|``."""
    lat = np.abs(np.asarray(latents)).max()
    rel = latent_rtol * max(1.0, lat) / lat + network_rtol(*torch_layers(pipe.vae))
    return float(0.5 * rel * np.abs(np.asarray(decoded)).max())


def torch_layers(*modules) -> tuple[int, int]:
    """``(depth, fan_in)`` of torch modules for :func:`network_rtol`: the number of ``Conv2d`` and
    ``Linear`` layers in all of them, and the largest number of inputs one output sums over
    (``in_channels / groups * kh * kw`` or ``in_features``)."""
    import torch

    depth, fan_in = 0, 1
    for module in modules:
        for m in module.modules():
            if isinstance(m, torch.nn.Conv2d):
                depth += 1
                kh, kw = m.kernel_size
                fan_in = max(fan_in, m.in_channels // m.groups * kh * kw)
            elif isinstance(m, torch.nn.Linear):
                depth += 1
                fan_in = max(fan_in, m.in_features)
    return depth, fan_in


# --------------------------------------------------------------------------- schedules
#
# diffusers builds a schedule in float32 torch: float32 betas, ``alpha = 1 - beta``, a cumprod;
# jaxdiff builds it in float64 and rounds each stored quantity once. The bounds below treat
# jaxdiff's float64 values as exact and follow diffusers' roundings to first order.


def float32_betas_atol(betas, beta_schedule: str):
    """``[T]`` bound on ``|beta_t(diffusers, float32) - beta_t|``. ``"squaredcos_cap_v2"`` (and
    ``trained_betas``): a float64 computation rounded once, ``ulps(1, beta_t)``. ``"linear"``:
    ``torch.linspace`` in float32, ``start + i * step`` with ``step = (end - start) / (T - 1)``:
    six roundings (the two end points included) of values up to ``beta_max``. ``"scaled_linear"``:
    the same on ``sqrt(beta)``, then squared: ``2 sqrt(beta) ulps(6, sqrt(beta_max)) + ulps(1,
    beta) <= ulps(13, beta_max)``. ``"sigmoid"``: ``sigmoid(linspace(-6, 6)) * (end - start) +
    start``: the argument errs by ``ulps(6, 6)``, the sigmoid's slope is <= 1/4 and its own error
    2 ulps of a value <= 1, then a product and a sum: ``ulps(13, beta_max)``."""
    betas = np.asarray(betas, np.float64)
    top = betas.max()
    per_schedule = {"squaredcos_cap_v2": ulps(1, betas), "linear": ulps(6, top),
                    "scaled_linear": ulps(13, top), "sigmoid": ulps(13, top)}
    return np.broadcast_to(per_schedule[beta_schedule], betas.shape)


def float32_alpha_rtol(betas, betas_atol):
    """``[T]`` bound ``e_s`` on the relative error of each float32 factor ``alpha_s = 1 - beta_s``
    of a float32 cumprod: the beta's error and the subtraction's rounding (an ulp of ``alpha_s``:
    ``EPS32 / 2`` in [0.5, 1)) relative to ``alpha_s``."""
    alphas = 1 - np.asarray(betas, np.float64)
    ulp = 2.0 ** (np.floor(np.log2(alphas)) - 23)
    return (betas_atol + ulp) / alphas


def float32_cumprod_rtol(betas, betas_atol):
    """``[T]`` bound on ``|abar_t(diffusers) - abar_t| / abar_t``: the factors' errors add
    (:func:`float32_alpha_rtol`), plus one rounding of each stored entry on either side (the pinned
    torch's CPU ``cumprod`` accumulates in float64, ``at::acc_type``, and rounds each entry once:
    the same scalar loop on every CPU)."""
    return np.cumsum(float32_alpha_rtol(betas, betas_atol)) + 2 * EPS32


def zero_snr_bounds(betas, betas_atol):
    """Bounds ``(betas, alphas_cumprod)`` on ``|diffusers - jaxdiff|`` (absolute, ``[T]`` each)
    for diffusers' float32 ``rescale_zero_terminal_snr`` of ``betas`` (the float64 ones before the
    rescale) followed by its ``alphas = 1 - betas`` and cumprod.

    The rescale is ``s_t = sqrt(abar_t)``, ``d_t = s_t - s_T`` (T the last step),
    ``abar'_t = (s_0 d_t / d_0)^2``, ``alpha'_t = abar'_t / abar'_{t-1}``. The subtraction cancels
    near the end (``d_t << s_t``), so the bound follows every rounding to first order: with the
    factors' relative errors ``e_s`` (:func:`float32_alpha_rtol`) shared by ``s_t`` and ``s_T``,
    ``d log alpha'_t = 2 (d log d_t - d log d_{t-1})`` where ``d log d_t = A_t / 2 - s_T B_t /
    (2 d_t) + R_t``, ``A_t = sum_{s <= t} e_s`` (cancels between ``t`` and ``t - 1`` but for
    ``e_t``), ``B_t = sum_{t < s} e_s`` and ``R_t`` the roundings of ``abar_t``, of its square root
    and of the subtraction (``1.5 u (s_t + s_T) / d_t + u``, ``u = EPS32`` a rounding); then the
    scaling, squaring and division (7 u). ``alpha'_T = 0`` and ``alpha'_0 = abar_0`` on both
    sides."""
    u = EPS32
    betas = np.asarray(betas, np.float64)
    e = float32_alpha_rtol(betas, betas_atol)
    s = np.sqrt(np.cumprod(1 - betas))
    d = s - s[-1]
    B = np.cumsum(e[::-1])[::-1] - e  # sum over s > t
    rel = np.zeros_like(betas)
    t = np.arange(1, len(betas) - 1)
    inv = 1 / d[t] - 1 / d[t - 1]
    delta = (0.5 * e[t] * (1 + s[-1] / d[t - 1]) + 0.5 * s[-1] * (B[t] + 3 * u) * inv
             + 1.5 * u * (s[t] / d[t] + s[t - 1] / d[t - 1]) + 2 * u)
    rel[t] = 2 * delta + 7 * u
    rel[0] = e[0] + 12 * u
    alphas = np.concatenate([s[:1] ** 2, (d[1:] / d[:-1]) ** 2])
    betas_bound = alphas * rel + u + ulps(1, 1 - alphas)  # 1 - alpha' rounded, jaxdiff's cast
    # diffusers then takes alphas'' = 1 - betas' (one rounding more) and their cumprod
    alpha_rel = np.where(alphas > 0, (betas_bound + u) / np.where(alphas > 0, alphas, 1), 0) + u
    abar = np.cumprod(alphas)
    return betas_bound, abar * (np.cumsum(alpha_rel) + 2 * u)


def _config(scheduler) -> dict:
    """A diffusers scheduler's config, without the keys its class does not take (``from_config``
    keeps them in the config but ignores them)."""
    import inspect

    taken = inspect.signature(type(scheduler).__init__).parameters
    return {k: v for k, v in scheduler.config.items() if k in taken}


def diffusers_betas64(scheduler):
    """jaxdiff's float64 betas (before any zero-SNR rescale) for a diffusers ``scheduler`` (its
    config's ``beta_schedule``, ``beta_start``, ``beta_end``, ``num_train_timesteps``), and
    diffusers' float32 bound on them (:func:`float32_betas_atol`)."""
    from jaxdiff.schedules import BETA_SCHEDULES

    config = _config(scheduler)
    name = config["beta_schedule"]
    kw = {} if name == "squaredcos_cap_v2" else dict(beta_start=config.get("beta_start", 1e-4),
                                                     beta_end=config.get("beta_end", 0.02))
    betas = BETA_SCHEDULES[{"squaredcos_cap_v2": "cosine"}.get(name, name)](
        config["num_train_timesteps"], **kw)
    return betas, float32_betas_atol(betas, name)


def diffusers_alphas_cumprod_atol(scheduler):
    """``[T]`` bound on a diffusers ``scheduler``'s float32 ``alphas_cumprod`` against jaxdiff's:
    :func:`float32_cumprod_rtol`, or :func:`zero_snr_bounds` where its class takes
    ``rescale_betas_zero_snr`` and it is set (the Euler schedulers floor the last entry at
    ``2**-24``)."""
    betas, atol = diffusers_betas64(scheduler)
    if _config(scheduler).get("rescale_betas_zero_snr"):
        bound = zero_snr_bounds(betas, atol)[1].copy()
        bound[-1] = 2.0**-24
        return bound
    return np.cumprod(1 - betas) * float32_cumprod_rtol(betas, atol)


def train_sigma_rtol(scheduler):
    """``[T]`` bound on the relative difference of the training sigmas ``sqrt((1 - abar) / abar)``
    of a diffusers ``scheduler``'s float32 schedule and jaxdiff's: the relative bound
    on ``abar`` (:func:`float32_cumprod_rtol`) times the condition number ``1 / (2 (1 - abar))``
    (the cancellation of ``1 - abar`` near ``abar = 1``, i.e. small t), plus each side's own
    roundings (``1 - abar``, the division, the square root, an interpolation and a float32 cast: 4
    a side)."""
    betas, atol = diffusers_betas64(scheduler)
    return float32_cumprod_rtol(betas, atol) / (2 * (1 - np.cumprod(1 - betas))) + ulps(8)


def add_noise_atol(scheduler, t, *arrays) -> float:
    """The bound on a noised start at timestep ``t`` (image-to-image) between a diffusers
    ``scheduler``'s float32 schedule and jaxdiff's, either form of ``add_noise``: ``sqrt(a) x0 +
    sqrt(1 - a) noise`` (moves by ``sqrt(a) rel / 2`` and ``a rel / (2 sqrt(1 - a))`` of ``m``, the
    largest of ``arrays``; ``rel`` from :func:`float32_cumprod_rtol`) or ``x0 + sigma noise``
    (``sigma`` by ``rel / (2 (1 - a))``); then about 6 roundings a side of values up to ``m (1 +
    sigma)``."""
    betas, atol = diffusers_betas64(scheduler)
    i = int(round(float(t)))
    a, rel = np.cumprod(1 - betas)[i], float32_cumprod_rtol(betas, atol)[i]
    sigma = np.sqrt((1 - a) / a)
    m = max(np.abs(np.asarray(x)).max() for x in arrays)
    vp = m * (np.sqrt(a) * rel / 2 + a * rel / (2 * np.sqrt(1 - a)))
    ve = m * sigma * rel / (2 * (1 - a))
    return float(max(vp, ve) + ulps(12, m * (1 + sigma)))


GRID_SIGMA_RTOL = 14 * EPS32  # a grid's sigmas from the same float32 alphas_cumprod on both sides:
# the float32 sigma formula (1 - abar, the division, the square root: 3 roundings a side) at both
# end points, which Karras / exponential / beta / lu grids pass on summed, and the float32 cast of
# a float64 grid (1 a side)


def within(err, bound, what: str = "") -> float:
    """Asserts ``err <= bound`` (elementwise where either is an array), records the largest
    ``err / bound`` for the current test (``--parity-ratios``) and returns it."""
    err, bound = np.broadcast_arrays(np.asarray(err, np.float64), np.asarray(bound, np.float64))
    assert np.isfinite(err).all(), f"{what}: non-finite error {err}"
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(err == 0, 0.0, err / bound)
    worst = int(np.argmax(ratios)) if ratios.size else 0
    ratio = float(ratios.reshape(-1)[worst]) if ratios.size else 0.0
    RECORDS.append((what, ratio))
    assert ratio <= 1.0, (f"{what}: error {err.reshape(-1)[worst]:.3g} > bound "
                          f"{bound.reshape(-1)[worst]:.3g} (entry {worst}; ratio {ratio:.3g})")
    return ratio


def allclose_ratio(actual, desired, rtol=1e-7, atol=0.0) -> float:
    """``max |actual - desired| / (atol + rtol |desired|)``: how much of ``numpy.testing.
    assert_allclose``'s tolerance a comparison uses (0 where both are equal, inf where the
    tolerance is 0 and they differ)."""
    actual = np.asarray(actual, np.float64)
    desired = np.asarray(desired, np.float64)
    diff = np.abs(actual - desired)
    tol = atol + rtol * np.abs(desired)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(diff == 0, 0.0, diff / tol)
    ratios = ratios[~(np.isnan(actual) & np.isnan(desired))]  # NaN == NaN, as assert_allclose
    return float(ratios.max()) if ratios.size else 0.0

