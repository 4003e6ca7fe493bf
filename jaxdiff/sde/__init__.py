"""Score-based generative modelling with SDEs (Song et al. 2021): VE / VP / sub-VP SDEs as frozen
pytrees, denoising score matching, predictor-corrector and probability-flow ODE samplers, exact
likelihoods with Hutchinson's trace estimator, and score networks.

- :mod:`jaxdiff.sde.sdes`: :class:`VESDE`, :class:`TutorialVESDE`, :class:`VPSDE`,
  :class:`SubVPSDE` (drift / diffusion, marginals, prior, ``discretize``, ``reverse``);
- :mod:`jaxdiff.sde.predictors`, :mod:`jaxdiff.sde.correctors`, :mod:`jaxdiff.sde.pc`:
  :func:`pc_sample`, any predictor with any corrector, one ``lax.scan``;
- :mod:`jaxdiff.sde.ode`: :func:`ode_sample` / :func:`ode_encode` (fixed-step in a scan, or
  adaptive with diffrax);
- :mod:`jaxdiff.sde.likelihood`: :func:`ode_likelihood`, :func:`bits_per_dim`;
- :mod:`jaxdiff.sde.models`: :class:`ScoreMLP`, :class:`ScoreUNet`, :func:`score_from_eps`.

Every score function is ``score_fn(x [B, ...], t [B] float32) -> [B, ...]``. The training
objectives (denoising score matching, :func:`~jaxdiff.losses.dsm_loss` and
:func:`~jaxdiff.losses.eps_loss`) live with the other losses in :mod:`jaxdiff.losses.score`.
"""

from jaxdiff.sde.correctors import (
    CORRECTORS,
    annealed_langevin_corrector,
    langevin_corrector,
    no_corrector,
)
from jaxdiff.sde.likelihood import (
    DIVERGENCE_MODES,
    PROBES,
    LikelihoodResult,
    bits_per_dim,
    divergence,
    hutchinson_probe,
    ode_likelihood,
    uniform_dequantize,
)
from jaxdiff.sde.models import GaussianFourierProjection, ScoreMLP, ScoreUNet, score_from_eps
from jaxdiff.sde.ode import (
    ADAPTIVE_SOLVERS,
    FIXED_SOLVERS,
    ODE_SOLVERS,
    integrate,
    ode_encode,
    ode_sample,
    probability_flow_drift,
)
from jaxdiff.sde.predictors import (
    PREDICTORS,
    ancestral_predictor,
    euler_maruyama_predictor,
    no_predictor,
    reverse_diffusion_predictor,
)
from jaxdiff.sde.pc import pc_sample, sde_timesteps
from jaxdiff.sde.sdes import (
    SDE,
    SDE_TYPES,
    ReverseSDE,
    ScoreFn,
    SubVPSDE,
    TutorialVESDE,
    VESDE,
    VPSDE,
    batch_broadcast,
    vp_schedule,
)

__all__ = [
    "ADAPTIVE_SOLVERS",
    "CORRECTORS",
    "DIVERGENCE_MODES",
    "FIXED_SOLVERS",
    "ODE_SOLVERS",
    "PREDICTORS",
    "PROBES",
    "SDE",
    "SDE_TYPES",
    "GaussianFourierProjection",
    "LikelihoodResult",
    "ReverseSDE",
    "ScoreFn",
    "ScoreMLP",
    "ScoreUNet",
    "SubVPSDE",
    "TutorialVESDE",
    "VESDE",
    "VPSDE",
    "ancestral_predictor",
    "annealed_langevin_corrector",
    "batch_broadcast",
    "bits_per_dim",
    "divergence",
    "euler_maruyama_predictor",
    "hutchinson_probe",
    "integrate",
    "langevin_corrector",
    "no_corrector",
    "no_predictor",
    "ode_encode",
    "ode_likelihood",
    "ode_sample",
    "pc_sample",
    "probability_flow_drift",
    "reverse_diffusion_predictor",
    "score_from_eps",
    "sde_timesteps",
    "uniform_dequantize",
    "vp_schedule",
]
