"""placeholder, replaced below"""
from __future__ import annotations
from dataclasses import dataclass
from controller_asg.policy.target import TargetTracking, TargetSettings

@dataclass
class PredictiveSettings:
    min_instances: int = 1
    max_instances: int = 10
    cpu_target: float = 0.5
    tolerance: float = 0.1
    scale_in_window: float = 300.0
    lead: float = 90.0

class Predictive(TargetTracking):
    name = "predictive"
    def __init__(self, s):
        super().__init__(TargetSettings(s.min_instances, s.max_instances, s.cpu_target, s.tolerance, s.scale_in_window))
