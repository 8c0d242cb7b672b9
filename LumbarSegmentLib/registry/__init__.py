"""Model packages (safetensors + sealed manifest) and the registries that list, resolve and
publish them."""
