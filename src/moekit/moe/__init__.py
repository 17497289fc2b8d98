"""The sparse MoE layer and its swappable parts: router -> dispatcher -> experts -> combine."""

from moekit.moe.config import ACTIVATIONS, ROUTERS, MoEConfig
from moekit.moe.dispatch import DispatchState, LocalDispatcher, assign_slots, priority_order
from moekit.moe.experts import ExpertBank, HierarchicalExperts, SharedExperts
from moekit.moe.grouped import grouped_mm
from moekit.moe.layer import MoE, MoEOutput, MoEStats
from moekit.moe.router import ROUTER_CLASSES, Router, Routing, build_router

__all__ = [
    "ACTIVATIONS",
    "ROUTERS",
    "ROUTER_CLASSES",
    "DispatchState",
    "ExpertBank",
    "HierarchicalExperts",
    "LocalDispatcher",
    "MoE",
    "MoEConfig",
    "MoEOutput",
    "MoEStats",
    "Router",
    "Routing",
    "SharedExperts",
    "assign_slots",
    "build_router",
    "grouped_mm",
    "priority_order",
]
