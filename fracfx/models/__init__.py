"""The model zoo (plain PyTorch) and build_model(), which also reaches torchvision and `pkg.mod:factory`."""

from fracfx.models.registry import build_model, default_input_size, list_models

__all__ = ["build_model", "default_input_size", "list_models"]
