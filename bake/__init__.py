"""bake: fold steering maps into model weights, verify, export and publish."""
