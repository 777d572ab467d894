"""Publishing: the model card and provenance, the output folder (claim, temp folder, rename), and the
Hugging Face Hub."""
