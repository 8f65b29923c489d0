"""The program side: the DSPy provider for an Espalier server and the capture of LM calls."""

from espalier.program.provider import ArborProvider, ArborReinforceJob, GRPOJobError

__all__ = ["ArborProvider", "ArborReinforceJob", "GRPOJobError"]
