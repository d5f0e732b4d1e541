from depthlab.theory.simulate import SimulationResult, simulate

__all__ = ["SimulationResult", "simulate"]
