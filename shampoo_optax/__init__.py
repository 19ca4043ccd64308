# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""Distributed Shampoo for optax."""

from shampoo_optax._masks import hidden_matrices
from shampoo_optax._placement import abstract_state
from shampoo_optax._placement import pad_state
from shampoo_optax._placement import state_shardings
from shampoo_optax._placement import unpad_state
from shampoo_optax._report import state_report
from shampoo_optax._report import StateReport
from shampoo_optax._roots import default_root_method
from shampoo_optax._roots import drift_error
from shampoo_optax._roots import inverse_pth_root
from shampoo_optax._roots import InverseRootResult
from shampoo_optax._roots import root_error
from shampoo_optax._shampoo import scale_by_shampoo
from shampoo_optax._shampoo import shampoo
from shampoo_optax._shampoo import ShampooDiagnostics
from shampoo_optax._shampoo import ShampooState
from shampoo_optax._shampoo import STATIC_OPTIONS
from shampoo_optax._soap import basis_drift
from shampoo_optax._soap import scale_by_soap
from shampoo_optax._soap import soap
from shampoo_optax._soap import SOAP_STATIC_OPTIONS
from shampoo_optax._soap import SoapDiagnostics
from shampoo_optax._soap import SoapState

__version__ = "0.1.0"

__all__ = (
    "abstract_state",
    "basis_drift",
    "default_root_method",
    "drift_error",
    "hidden_matrices",
    "inverse_pth_root",
    "InverseRootResult",
    "pad_state",
    "root_error",
    "state_report",
    "StateReport",
    "scale_by_shampoo",
    "scale_by_soap",
    "shampoo",
    "ShampooDiagnostics",
    "ShampooState",
    "soap",
    "SOAP_STATIC_OPTIONS",
    "SoapDiagnostics",
    "SoapState",
    "STATIC_OPTIONS",
    "state_shardings",
    "unpad_state",
)
