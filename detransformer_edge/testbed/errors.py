"""Typed errors of the home-network testbed."""

from detransformer_edge.errors import DetransformerError


class TestbedUnavailable(DetransformerError):
    """This host cannot build an emulated home; the message lists exactly what is missing.

    Raised before anything is created, so a caller (a test, a benchmark) can skip with the
    message as its reason instead of failing half way through a build.
    """

    __test__ = False  # not a pytest test class despite the name


class TestbedError(DetransformerError):
    """Building, using or tearing down an emulated home failed; the message names the step."""

    __test__ = False
