"""Phi-3-vision (microsoft/Phi-3-vision-128k-instruct, Phi-3.5-vision) processing, ported to transformers 5.x.

Only the image processor and the processor live here; the modeling part is not ported yet, so nothing is
registered with the Auto classes (their `register` methods need a config class).
"""

from worker.models.phi3v.image_processing_phi3_v import Phi3VImageProcessor
from worker.models.phi3v.processing_phi3_v import Phi3VProcessor

__all__ = ["Phi3VImageProcessor", "Phi3VProcessor"]
