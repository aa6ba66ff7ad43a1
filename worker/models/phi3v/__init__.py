"""Phi-3-vision (microsoft/Phi-3-vision-128k-instruct, Phi-3.5-vision), ported to transformers 5.x.

Importing this package registers the port with the Auto classes under model type "phi3_v", so
`AutoConfig`, `AutoModelForCausalLM`, `AutoModelForImageTextToText`, `AutoImageProcessor` and `AutoProcessor`
load a checkpoint (the original or one saved by this port) without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

# From its module: without torchvision, transformers 5.17's top-level `AutoImageProcessor` is a placeholder that
# raises on any use (5.24 resolves it); the class itself needs only PIL.
from transformers.models.auto.image_processing_auto import AutoImageProcessor

from worker.models.phi3v.configuration_phi3_v import Phi3VConfig
from worker.models.phi3v.image_processing_phi3_v import Phi3VImageProcessor
from worker.models.phi3v.modeling_phi3_v import Phi3VForCausalLM, Phi3VImageEmbedding, Phi3VModel
from worker.models.phi3v.processing_phi3_v import Phi3VProcessor


def register() -> None:
    """Register with the Auto classes; exist_ok makes re-imports (e.g. module reloads in tests) harmless."""
    AutoConfig.register(Phi3VConfig.model_type, Phi3VConfig, exist_ok=True)
    AutoModelForCausalLM.register(Phi3VConfig, Phi3VForCausalLM, exist_ok=True)
    AutoModelForImageTextToText.register(Phi3VConfig, Phi3VForCausalLM, exist_ok=True)
    # The "pil" backend is the only one: the processor works on PIL images, with no torchvision variant.
    AutoImageProcessor.register(Phi3VConfig, image_processor_classes={"pil": Phi3VImageProcessor}, exist_ok=True)
    AutoProcessor.register(Phi3VConfig, Phi3VProcessor, exist_ok=True)


register()

__all__ = [
    "Phi3VConfig",
    "Phi3VForCausalLM",
    "Phi3VImageEmbedding",
    "Phi3VImageProcessor",
    "Phi3VModel",
    "Phi3VProcessor",
]
