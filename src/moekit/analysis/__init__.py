"""Routing analysis: what each MoE layer does on real text, and a report to look at."""

from moekit.analysis.categories import CATEGORIES, char_categories, token_categories
from moekit.analysis.report import layer_summary, write_analysis_report
from moekit.analysis.routing import LayerAnalysis, RoutingAnalysis, analyze_routing, mutual_information

__all__ = [
    "CATEGORIES",
    "LayerAnalysis",
    "RoutingAnalysis",
    "analyze_routing",
    "char_categories",
    "layer_summary",
    "mutual_information",
    "token_categories",
    "write_analysis_report",
]
