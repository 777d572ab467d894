"""Model families: what differs between baking a causal LM and a diffusers pipeline (see base.Family)."""
