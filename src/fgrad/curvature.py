"""Curvature estimators: Hessian diagonals, traces, extreme eigenvalues and spectra from
Hessian-vector products, for models too large for a dense Hessian; and the Hessian's
positive semi-definite cousins (generalised Gauss-Newton, Fisher) for
``model_fn(params, x)`` with ``loss_fn(outputs, y)``."""

from fgrad._curvature import Eigen as Eigen
from fgrad._curvature import Estimate as Estimate
from fgrad._curvature import Spectrum as Spectrum
from fgrad._curvature import hessian_diagonal as hessian_diagonal
from fgrad._curvature import hessian_eigenvalues as hessian_eigenvalues
from fgrad._curvature import hessian_spectrum as hessian_spectrum
from fgrad._curvature import hessian_trace as hessian_trace
from fgrad._ggn import CrossEntropy as CrossEntropy
from fgrad._ggn import MeanSquaredError as MeanSquaredError
from fgrad._ggn import cross_entropy as cross_entropy
from fgrad._ggn import fisher_vp as fisher_vp
from fgrad._ggn import ggn_diagonal as ggn_diagonal
from fgrad._ggn import ggn_vp as ggn_vp
from fgrad._ggn import mean_squared_error as mean_squared_error
from fgrad._kfac import KFAC as KFAC
from fgrad._kfac import kfac as kfac

__all__ = [
    "KFAC",
    "CrossEntropy",
    "Eigen",
    "Estimate",
    "MeanSquaredError",
    "Spectrum",
    "cross_entropy",
    "fisher_vp",
    "ggn_diagonal",
    "ggn_vp",
    "hessian_diagonal",
    "hessian_eigenvalues",
    "hessian_spectrum",
    "hessian_trace",
    "kfac",
    "mean_squared_error",
]
