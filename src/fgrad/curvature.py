"""Curvature estimators: Hessian diagonals, traces, extreme eigenvalues and spectra from
Hessian-vector products, for models too large for a dense Hessian."""

from fgrad._curvature import Eigen as Eigen
from fgrad._curvature import Estimate as Estimate
from fgrad._curvature import Spectrum as Spectrum
from fgrad._curvature import hessian_diagonal as hessian_diagonal
from fgrad._curvature import hessian_eigenvalues as hessian_eigenvalues
from fgrad._curvature import hessian_spectrum as hessian_spectrum
from fgrad._curvature import hessian_trace as hessian_trace

__all__ = [
    "Eigen",
    "Estimate",
    "Spectrum",
    "hessian_diagonal",
    "hessian_eigenvalues",
    "hessian_spectrum",
    "hessian_trace",
]
