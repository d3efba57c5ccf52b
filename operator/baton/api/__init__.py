"""Baton's Kubernetes API: the DisaggregatedModel resource as pydantic models (the single source of
truth), and the CRD generated from them."""

from baton.api.v1alpha1 import GROUP, KIND, PLURAL, VERSION, DisaggregatedModel  # noqa: F401
