"""Retrofit HAT into existing models: :func:`convert`, :func:`report`, :func:`save`, :func:`load`.

The package is ``hatplug.conversion``; the functions are also ``hatplug.convert``, ``hatplug.report``,
``hatplug.save`` and ``hatplug.load``.
"""

from .io import load, read_config, save
from .report import BlockRecord, ConversionReport, report
from .rewrite import INIT_MODES, CarrierSequence, CarrierStage, convert
from .tracer import HatplugTracer, symbolic_trace

__all__ = [
    "INIT_MODES",
    "BlockRecord",
    "CarrierSequence",
    "CarrierStage",
    "ConversionReport",
    "HatplugTracer",
    "convert",
    "load",
    "read_config",
    "report",
    "save",
    "symbolic_trace",
]
