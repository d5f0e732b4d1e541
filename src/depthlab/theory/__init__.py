from depthlab.theory.simulate import SimulationResult, simulate

__all__ = ["simulate", "SimulationResult"]
